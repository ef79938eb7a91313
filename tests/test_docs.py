"""The README and docs/*.md: every shell command they show is run and exits as the page says, every option
they write exists, every option a command has is in docs/commands.md, every link resolves, and every page is
listed in docs/index.md and the README.

What counts as a command: a `$ ...` line in any code block (its expected exit code is the `(exit N)` line of its
output, else 0), and every line of a ```bash block. A block right after a `<!-- not run: reason -->` comment is
reported as skipped with that reason; so are the programs in NOT_RUN_PROGRAMS, wherever they appear. After an
`<!-- output checked -->` comment, every output line the block shows (but `...`) must be in the real output too,
for examples whose output does not depend on the machine. A page added to docs/ is picked up by the glob, with
nothing to edit here.

Where the commands run: a fresh copy of a small project per page (the repository's recipes/ and quickstart,
plus tests/fixtures/docs/<page>/, the files that page's examples name as a user's own, and the copies listed in
its copies.yaml), offline, with HOME and the Hugging Face cache inside it. A finished quickstart run is in
every copy (outputs/quickstart), made once by the README's own command. `ftclip train` runs 2 optimizer steps
(TRAIN_SHORTENING, a --set that wins over the page's own --max-steps): the same code paths as the full run, a
fraction of its time.
Pages run in parallel, their commands in order, each `ftclip` in a fork of one process that imported torch and
transformers once (tests/docs_zygote.py; FTCLIP_DOCS_FRESH_PROCESSES=1 starts a fresh process for each)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import typer
import yaml

from ftclip.cli import app
from ftclip.reference import slug

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
FIXTURES = REPO / "tests" / "fixtures" / "docs"

NOT_RUN_MARK = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
OUTPUT_MARK = re.compile(r"<!--\s*output checked\s*-->")
EXIT_LINE = re.compile(r"^\s*\(exit (\d+)\)\s*$")
# Programs no test can run, wherever a page shows them.
NOT_RUN_PROGRAMS = {
    "pip": "installs packages; .ci/run installs ftclip this way on a clean clone",
    "make": "each make target installs the package (pip) first; the test suite runs what the targets run",
}
TRAIN_SHORTENING = "--set max_steps=2"
SHARED_RUN = "ftclip train recipes/quickstart.yaml"  # the README's; leaves outputs/quickstart in every copy
TIMEOUT_S = 300


# ---------------------------------------------------------------- reading the pages


@dataclass(frozen=True)
class DocCommand:
    page: str  # relative to the repository
    line: int
    text: str
    exit_code: int = 0
    not_run: str | None = None  # the reason, for a command no test runs
    output: tuple[str, ...] = ()  # lines its real output must hold (an `<!-- output checked -->` block)

    @property
    def label(self) -> str:
        return f"{self.page}:{self.line}"


def code_blocks(text: str):
    """(first line number, language, lines, the comment right before the block) for each fenced block."""
    lines = text.splitlines()
    index, before = 0, ""
    while index < len(lines):
        opening = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", lines[index])
        if not opening:
            if lines[index].strip():
                before = lines[index].strip()
            index += 1
            continue
        fence, language = opening.groups()
        body, start = [], index + 2
        index += 1
        while index < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[index]):
            body.append(lines[index])
            index += 1
        index += 1
        yield start, language, body, before
        before = ""


def logical_lines(lines: list[str], first: int):
    """Lines joined at a trailing backslash, each with its first line's number."""
    joined, start = "", first
    for number, line in enumerate(lines, first):
        if not joined:
            start = number
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        yield start, (joined + line).strip()
        joined = ""


def commands_in(page: Path) -> list[DocCommand]:
    name = str(page.relative_to(REPO))
    found = []
    for first, language, body, before in code_blocks(page.read_text(encoding="utf-8")):
        mark = NOT_RUN_MARK.search(before)
        reason = mark.group(1) if mark else None
        checked = bool(OUTPUT_MARK.search(before))
        prompts = [index for index, line in enumerate(body) if line.strip().startswith("$ ")]
        if prompts:
            for position, index in enumerate(prompts):
                output = body[index + 1: prompts[position + 1] if position + 1 < len(prompts) else len(body)]
                exits = [int(m.group(1)) for line in output if (m := EXIT_LINE.match(line))]
                shown = tuple(line.strip() for line in output if line.strip() not in ("", "...") and not EXIT_LINE.match(line))
                text = body[index].strip()[2:]
                found.append(DocCommand(name, first + index, text, exits[-1] if exits else 0, reason,
                                        shown if checked else ()))
        elif language in ("bash", "sh", "shell"):
            for number, text in logical_lines(body, first):
                if text and not text.startswith("#"):
                    found.append(DocCommand(name, number, text, 0, reason))
    return found


ALL_COMMANDS = [command for page in PAGES for command in commands_in(page)]


def without_comment(text: str) -> str:
    """The command without a trailing shell comment (a # after a space, outside quotes)."""
    quote = None
    for index, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            return text[:index].rstrip()
    return text


def segments(text: str) -> list[str]:
    """The command split at &&, ||, ; and | outside quotes (the separators kept as their own items)."""
    parts, current, quote, index = [], "", None, 0
    while index < len(text):
        char = text[index]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif text.startswith(("&&", "||"), index) or char in ";|":
            separator = text[index:index + 2] if text.startswith(("&&", "||"), index) else char
            parts += [current.strip(), separator]
            current, index = "", index + len(separator)
            continue
        current += char
        index += 1
    return [*parts, current.strip()]


def program(segment: str) -> str:
    words = [word for word in shlex.split(segment) if not re.match(r"^\w+=", word)]
    return words[0] if words else ""


def ftclip_call(segment: str) -> list[str] | None:
    """The words after `ftclip` (or `python -m ftclip`) in a segment, or None when it runs something else."""
    words = shlex.split(segment)
    for index, word in enumerate(words):
        if word == "ftclip" and (index == 0 or words[index - 1] == "-m" or re.match(r"^\w+=", words[index - 1])):
            return words[index + 1:]
    return None


def runnable(command: DocCommand) -> tuple[str | None, str | None]:
    """(what to run, why parts are not run): the command without its not-run programs, train shortened."""
    parts, reasons = [], []
    for segment in segments(without_comment(command.text)):
        if segment in ("&&", "||", ";", "|"):
            parts.append(segment)
            continue
        name = program(segment)
        reason = next((why for prefix, why in NOT_RUN_PROGRAMS.items() if name == prefix), None)
        if reason:
            reasons.append(f"{name}: {reason}")
            if parts and parts[-1] == "&&":
                parts.pop()
            continue
        call = ftclip_call(segment)
        if call and call[0] == "train":
            segment = f"{segment} {TRAIN_SHORTENING}"
        parts.append(segment)
    while parts and parts[0] in ("&&", "||", ";", "|"):
        parts.pop(0)
    return (" ".join(parts) or None), ("; ".join(reasons) or None)


# ---------------------------------------------------------------- running them


ZYGOTE = Path(__file__).resolve().parent / "docs_zygote.py"
ZYGOTE_ENV = "FTCLIP_DOCS_ZYGOTE"  # the socket of the warmed ftclip, when one runs


def environment(project: Path, zygote: str | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("GITHUB_", "WANDB_", "MLFLOW_", "HF_", "FTCLIP_"))}
    env.update(
        PATH=f"{project / '.bin'}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(project / ".home"), HF_HOME=str(project.parent / "hf-home"),  # HF_HOME: one for all (read at import)
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg", NO_COLOR="1", TTY_INTERACTIVE="0",
    )
    if zygote:
        env[ZYGOTE_ENV] = zygote
    return env


def run_in(project: Path, text: str, zygote: str | None = None) -> tuple[int, str, float]:
    started = time.perf_counter()
    try:
        done = subprocess.run(["bash", "-c", text], cwd=project, env=environment(project, zygote),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        code, output = -1, f"timed out after {TIMEOUT_S} s\n{expired.stdout or ''}{expired.stderr or ''}"
    return code, output, time.perf_counter() - started


def make_template(folder: Path) -> None:
    """The project every page's copy starts from."""
    shutil.copytree(REPO / "recipes", folder / "recipes", ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir = folder / ".bin"
    bin_dir.mkdir()
    # The commands call `ftclip` and `python` as a user would; both mean this interpreter and this checkout.
    python = shlex.quote(sys.executable)
    shims = {
        "ftclip": f'[ -n "${ZYGOTE_ENV}" ] && exec {python} -I -S {shlex.quote(str(ZYGOTE))} call "${ZYGOTE_ENV}" "$@"\n'
                  f'exec {python} -m ftclip "$@"',
        "python": f'exec {python} "$@"',
        "python3": f'exec {python} "$@"',
    }
    for name, body in shims.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)


def start_zygote(template: Path) -> tuple[subprocess.Popen, str]:
    address = str(Path(tempfile.mkdtemp(prefix="ftclip-docs-")) / "ftclip.sock")  # short: sockets allow ~100 bytes
    log = template.parent / "zygote.log"  # a file, not a pipe nobody reads while the commands run
    with open(log, "w") as errors:
        server = subprocess.Popen([sys.executable, str(ZYGOTE), "serve", address], cwd=template,
                                  env=environment(template), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=errors, text=True, start_new_session=True)
    if server.stdout.readline().strip() != "ready":
        server.kill()
        raise RuntimeError(f"the warmed ftclip did not start:\n{log.read_text()[-3000:]}")
    return server, address


def page_project(template: Path, folder: Path, page: str) -> Path:
    shutil.copytree(template, folder, symlinks=True)
    own = FIXTURES / Path(page).stem
    if own.is_dir():
        shutil.copytree(own, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("copies.yaml"))
        copies = own / "copies.yaml"
        for target, source in (yaml.safe_load(copies.read_text()) if copies.exists() else {}).items():
            (folder / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / source, folder / target)
    return folder


@pytest.fixture(scope="session")
def doc_runs(request, tmp_path_factory) -> dict[DocCommand, tuple[int, str, float]]:
    """Runs the commands of every page the session selected (pages in parallel, commands in order)."""
    selected = {item.callspec.params["command"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_doc_command" and hasattr(item, "callspec")}
    pages = sorted({command.page for command in selected if command.not_run is None})
    root = tmp_path_factory.mktemp("docs-commands")
    template = root / "template"
    make_template(template)
    server, zygote = (None, None) if os.environ.get("FTCLIP_DOCS_FRESH_PROCESSES") == "1" else start_zygote(template)
    try:
        shared = run_in(template, f"{SHARED_RUN} {TRAIN_SHORTENING}", zygote)
        assert shared[0] == 0, f"`{SHARED_RUN} {TRAIN_SHORTENING}` failed (exit {shared[0]}):\n{shared[1][-3000:]}"

        def run_page(page: str) -> dict:
            project = page_project(template, root / Path(page).stem, page)
            results = {}
            for command in (command for command in ALL_COMMANDS if command.page == page and command.not_run is None):
                text, _ = runnable(command)
                if text is not None:
                    same = text == f"{SHARED_RUN} {TRAIN_SHORTENING}"
                    results[command] = shared if same else run_in(project, text, zygote)
            return results

        results = {}
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            for page_results in pool.map(run_page, pages):
                results.update(page_results)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)  # the server and any command still running in its forks
            server.wait()
            shutil.rmtree(Path(zygote).parent, ignore_errors=True)
    return results


def doc_command_param(command: DocCommand):
    text, reasons = runnable(command)
    reason = command.not_run or (reasons if text is None else None)
    marks = [pytest.mark.skip(reason=f"not run: {reason}")] if reason else []
    return pytest.param(command, id=command.label, marks=marks)


@pytest.mark.parametrize("command", [doc_command_param(command) for command in ALL_COMMANDS])
def test_doc_command(command: DocCommand, doc_runs):
    code, output, seconds = doc_runs[command]
    text, _ = runnable(command)
    assert code == command.exit_code, (
        f"{command.label}: `{command.text}` exits {code} (the page says {command.exit_code}); ran `{text}` "
        f"in {seconds:.1f} s:\n{output[-4000:]}"
    )
    # Wrapping depends on the terminal's width: compare with every run of white space made one space.
    printed = " ".join(output.split())
    missing = [line for line in command.output if " ".join(line.split()) not in printed]
    assert not missing, f"{command.label}: the page shows lines the command no longer prints:\n" + "\n".join(
        missing) + f"\n\nit printed:\n{output[-4000:]}"


def test_the_pages_show_commands_that_run():
    """Most of what the pages show is run: the skipped ones are the few the pages mark, with their reasons."""
    run = [command for command in ALL_COMMANDS if command.not_run is None and runnable(command)[0]]
    assert len(run) >= 20, [command.label for command in run]
    for command in ALL_COMMANDS:
        assert command.not_run is None or len(command.not_run) > 20, f"{command.label}: say why it is not run"


# ---------------------------------------------------------------- options and commands


def cli_commands() -> dict[str, click.Command]:
    return typer.main.get_command(app).commands


def option_names(command: click.Command) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts) if name.startswith("-")}


def test_every_option_the_pages_write_exists():
    """Also for the commands no test runs (a GPU's, torchrun's): a renamed option fails here."""
    commands = cli_commands()
    problems = []
    for command in ALL_COMMANDS:
        for segment in segments(without_comment(command.text)):
            call = ftclip_call(segment) if segment not in ("&&", "||", ";", "|") else None
            if not call:
                continue
            name, *words = call
            if name not in commands:
                problems.append(f"{command.label}: no command `ftclip {name}`")
                continue
            for word in words:
                flag = word.split("=", 1)[0]
                if flag.startswith("-") and flag not in option_names(commands[name]) | {"--help"}:
                    problems.append(f"{command.label}: `ftclip {name}` has no option {flag}")
    assert not problems, "\n".join(problems)


def test_commands_page_lists_every_option_of_every_command():
    page = (DOCS / "commands.md").read_text(encoding="utf-8")
    problems = []
    for name, command in cli_commands().items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `ftclip {name}")), None)
        if row is None:
            problems.append(f"docs/commands.md has no table row for `ftclip {name}`")
            continue
        for param in command.params:
            names = [opt for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")]
            if names and not any(re.search(rf"{re.escape(opt)}(?![\w-])", row) for opt in names):
                problems.append(f"docs/commands.md: `ftclip {name}` row lacks {' / '.join(names)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", [None, *cli_commands()])
def test_help_of_every_command(name):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [name, "--help"] if name else ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


# ---------------------------------------------------------------- links and the index


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def headings(page: Path) -> set[str]:
    inside, found = False, set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s*(```|~~~)", line):
            inside = not inside
        elif not inside and (heading := re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)):
            found.add(slug(heading.group(1)))
    return found


def test_every_link_resolves():
    problems = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):
                continue  # a web address: not checked offline
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                problems.append(f"{page.relative_to(REPO)}: {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in headings(resolved):
                problems.append(f"{page.relative_to(REPO)}: {target}: no heading with that anchor")
    assert not problems, "\n".join(problems)


def linked_pages(page: Path) -> set[Path]:
    targets = LINK.findall(page.read_text(encoding="utf-8"))
    return {(page.parent / target.partition("#")[0]).resolve() for target in targets if not re.match(r"^[a-z]+:", target)}


@pytest.mark.parametrize("index", ["docs/index.md", "README.md"])
def test_every_docs_page_is_listed(index):
    listed = linked_pages(REPO / index)
    missing = [str(page.relative_to(REPO)) for page in sorted(DOCS.glob("*.md"))
               if page.name != "index.md" and page.resolve() not in listed]
    assert not missing, f"{index} does not link {missing}: add a line for each to docs/index.md and README.md"


def test_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    assert readme.splitlines()[3].startswith("pip install -c constraints-cpu.txt -e . && ftclip train recipes/quickstart.yaml")
    assert readme.splitlines()[4].startswith("make test")
