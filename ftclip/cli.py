"""The command line: the only place that turns ftclip's errors into messages and exit codes
(0 ok, 1 run stopped because it diverged, or import-axolotl failed unexpectedly on a config, 2 bad input,
3 storage failure: a checkpoint or the result could not be written (disk full, read-only or permission denied;
earlier checkpoints intact), 130/143 stopped by SIGINT/SIGTERM).

Imports: this module's top imports only typer, rich and ftclip's light modules (errors, recipe). torch,
transformers, datasets, peft and bitsandbytes cost seconds, so they are imported inside the command functions
that need them (`train`, `merge`, ...), never here or in a helper that `validate`, `schema` or `--help` runs;
tests/test_cli.py::test_light_commands_import_no_heavy_library checks it."""

from __future__ import annotations

import errno
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ftclip.errors import FtclipError, PeerLost, Problem, RecipeError, RunStopped, StorageError
from ftclip.recipe import Recipe
from ftclip.recipe_files import read_recipe
from ftclip.terminal import make_console, user

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune LLMs (LoRA, QLoRA, full) from YAML recipes, with a fast and visible gradient clip.",
)
console = make_console()
error_console = make_console(stderr=True)

EXIT_FAILED = 1
EXIT_PEER_LOST = EXIT_FAILED  # under torchrun: another process of the run died; this one stops too
EXIT_BAD_INPUT = 2
EXIT_STORAGE = 3
EXIT_INTERRUPTED = 130

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", show_default=False,
                 help="Override a recipe key before validation (dotted key, YAML value; repeatable), "
                      "e.g. --set learning_rate=1e-4 --set datasets.0.path=data.jsonl."),
]


def _fail(error: FtclipError) -> None:
    error_console.print(f"[bold red]error:[/] {user(error)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _quiet_libraries() -> None:
    # transformers' per-file progress bars and advisories would drown ftclip's own progress view.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # peft calls a transformers method that transformers 5 deprecated; the advice is for peft, not users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _filesystem_problems(recipe: Recipe, path: Path) -> tuple[list[Problem], list[tuple[str, str]]]:
    """Checks that look at disk but load no weights and use no network: local data files parse, model folders
    and ids make sense. Returns problems and notices (e.g. a hub dataset missing from the local cache)."""
    from ftclip.data import check_datasets
    from ftclip.modeling import check_model_source
    from ftclip.overrides import blame, recipe_overrides
    from ftclip.recipe import key_line
    from ftclip.trackers import tracker_problems

    data_problems, notices = check_datasets(recipe)
    kernels = _kernel_problems(recipe)
    if recipe.device != "cpu":  # a recipe may be meant for a GPU box: CI validates it here, `train` refuses it
        notices, kernels = notices + [(key, f"{message} — `ftclip train` will refuse it here") for key, message in kernels], []
    found = data_problems + check_model_source(recipe) + tracker_problems(recipe) + kernels
    problems = [Problem(str(path), key, message, key_line(path, key)) for key, message in found]
    return blame(problems, recipe_overrides(recipe)), notices


def _kernel_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Attention/loss kernels and QLoRA-under-FSDP against this machine, answered without importing torch."""
    from ftclip.modeling import kernel_problems
    from ftclip.optim import why_no_cuda_without_torch

    return kernel_problems(recipe, why_no_cuda_without_torch() is None)


def _notices(recipe: Recipe) -> list[tuple[str, str]]:
    """Valid, but worth a word, as (key, message): settings that run foreign code, or that this machine cannot run."""
    from ftclip.optim import optimizer_device_problem, why_no_cuda_without_torch
    from ftclip.recipe import warmup_warning

    notices = [("trust_remote_code", "true runs code shipped with the model")] if recipe.trust_remote_code else []
    short_warmup = warmup_warning(recipe, recipe.max_steps) if recipe.max_steps else None
    if short_warmup:  # known here only when max_steps sets the length; train says it in every case
        notices.append(("warmup_steps", short_warmup.removeprefix("warmup_steps: ")))
    if recipe.optimizer.startswith("paged_"):  # the CUDA probe reads a few files; torch itself is never imported here
        why_not = why_no_cuda_without_torch()
        problem = optimizer_device_problem(recipe, why_not is None, why_not or "")
        if problem:  # device: cpu is an error already; auto/cuda may be meant for another machine
            notices.append(("optimizer", f"{problem} — `ftclip train` will refuse it here"))
    if recipe.processor_type:
        from ftclip.vlm import vision_notices

        notices += vision_notices(recipe)
    return notices


def import_summary(recipe: Recipe) -> list[str]:
    """For an Axolotl config read through the importer: the short form of its report (plain text, user keys
    and values in it): how many keys kept their name, which were converted, which were dropped."""
    result = recipe._imported
    if result is None:
        return []
    same = [old for old, new, _ in result.mapped if new.split(":", 1)[0] == old]
    converted = [f"{old} → {new}" if old != "(absent)" else f"{new} (Axolotl's default)"
                 for old, new, _ in result.mapped if new.split(":", 1)[0] != old]
    lines = ["an Axolotl config, read through the importer in memory (`ftclip import-axolotl` writes the recipe "
             "to commit):", f"  mapped {len(result.mapped)} keys: {len(same)} keep their names"
             + (f"; {'; '.join(converted)}" if converted else "")]
    if result.dropped:
        lines.append(f"  dropped {len(result.dropped)}, no effect on what is trained: "
                     + ", ".join(key for key, _ in result.dropped))
    return lines


def _print_import_summary(recipe: Recipe, to: Console) -> None:
    for index, line in enumerate(import_summary(recipe)):
        to.print(f"[bold]note:[/] {user(line)}" if index == 0 else user(line), highlight=False, soft_wrap=True)


def _annotation_property(value: str) -> str:
    # GitHub's workflow-command escaping (actions/toolkit command.ts escapeProperty).
    return _annotation_data(value).replace(":", "%3A").replace(",", "%2C")


def _annotation_data(value: str) -> str:
    # GitHub's workflow-command escaping (actions/toolkit command.ts escapeData): the message must stay on one line.
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_annotation(level: str, file: str, line: int | None, key: str, message: str) -> str:
    """`::error file=F,line=N,title=KEY::MESSAGE` (or ::warning): GitHub Actions shows it on that line of the
    pull request's diff. The file is made relative to the checkout (GITHUB_WORKSPACE) when it lies inside it."""
    path = Path(file)
    workspace = Path(os.environ.get("GITHUB_WORKSPACE") or Path.cwd())
    if path.is_absolute() and path.resolve().is_relative_to(workspace.resolve()):
        path = path.resolve().relative_to(workspace.resolve())
    properties = [f"file={_annotation_property(path.as_posix())}"]
    if line:
        properties.append(f"line={line}")
    if key:
        properties.append(f"title={_annotation_property(key)}")
    return f"::{level} {','.join(properties)}::{_annotation_data(message)}"


def _validation_annotations(result: dict) -> list[str]:
    from ftclip.recipe import key_line

    lines = [github_annotation("error", p.file, p.line, p.key, p.message) for p in result["problems"]]
    for key, message in result["notices"]:
        lines.append(github_annotation("warning", result["file"], key_line(result["file"], key), key, message))
    return lines


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files to check.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable results.")] = False,
    overrides: SetOption = None,
) -> None:
    """Check recipes without loading weights: schema, combinations, data files, model paths. Exit 2 if any is invalid.

    Under GitHub Actions (GITHUB_ACTIONS=true) each problem is also printed as an ::error/::warning annotation."""
    results = []
    for path in recipes:
        try:
            recipe = read_recipe(path, overrides)
            problems, data_notices = _filesystem_problems(recipe, path)
            notices = _notices(recipe) + data_notices
            imported = recipe._imported
        except RecipeError as error:
            problems, notices, imported = error.problems, [], None
        results.append({"file": str(path), "valid": not problems, "problems": problems, "notices": notices,
                        "imported": imported, "summary": import_summary(recipe) if imported else []})
    if as_json:
        payload = [
            {"file": r["file"], "valid": r["valid"],
             "problems": [{"line": p.line, "key": p.key, "message": p.message} for p in r["problems"]],
             "warnings": [f"{key}: {message}" for key, message in r["notices"]],
             **({"axolotl_import": r["imported"].as_json()} if r["imported"] else {})}
            for r in results
        ]
        print(json.dumps(payload, indent=2))
    else:
        for result in results:
            if result["valid"]:
                console.print(f"[green]ok[/]      {user(result['file'])}", highlight=False, soft_wrap=True)
            else:
                console.print(f"[red]invalid[/] {user(result['file'])}", highlight=False, soft_wrap=True)
                for problem in result["problems"]:
                    console.print(f"  {user(problem)}", highlight=False, soft_wrap=True)
            for line in result["summary"]:
                console.print(f"  note: {user(line.strip())}" if line.startswith("an Axolotl") else f"  {user(line)}",
                              highlight=False, soft_wrap=True)
            for key, message in result["notices"]:
                console.print(f"  [yellow]warning:[/] {user(key)}: {user(message)}", highlight=False, soft_wrap=True)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        # The runner reads workflow commands from stdout and stderr alike; stderr keeps --json's stdout parseable.
        for result in results:
            for line in _validation_annotations(result):
                print(line, file=sys.stderr if as_json else sys.stdout, flush=True)
    if not all(result["valid"] for result in results):
        raise typer.Exit(EXIT_BAD_INPUT)


def _leave_worker(code: int) -> None:
    """Under torchrun, end the worker now that its work is saved, its trackers closed and its process groups
    destroyed, without interpreter finalization. Under FSDP2, torch's DTensor dispatch cache keeps the gloo group,
    and its worker threads, alive past destroy_process_group; a worker that releases a finished collective holding
    a Python tensor during finalization asks for the GIL, CPython ends it with pthread_exit, and the unwind through a
    noexcept destructor aborts the process ("terminate called without an active exception"), which torchrun reports
    as a failed run. Details and a reproducer without ftclip: docs/distributed-teardown.md."""
    if "LOCAL_RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _is_rank_zero() -> bool:
    """True outside torchrun too; torchrun sets RANK for each worker."""
    return int(os.environ.get("RANK", "0")) == 0


def _several_nodes() -> bool:
    """torchrun reads each of its options from a PET_<OPTION> variable when the command line lacks it, so --nproc
    joins a run of several nodes when PET_NNODES, PET_NODE_RANK, PET_RDZV_BACKEND and PET_RDZV_ENDPOINT are set."""
    return os.environ.get("PET_NNODES", "1") not in ("1", "1:1")


def _exec_torchrun(nproc: int) -> None:
    """Replace this process with torchrun running the same command in N processes on this machine (torch's
    launcher; --standalone picks a free port, so two runs on one machine do not collide)."""
    import sys

    arguments = sys.argv[1:]
    for index, value in enumerate(arguments):  # drop --nproc N / --nproc=N so the workers don't re-launch
        if value == "--nproc":
            del arguments[index:index + 2]
            break
        if value.startswith("--nproc="):
            del arguments[index]
            break
    # Several machines take their rendezvous from torchrun's PET_* variables, which --standalone would override.
    standalone = [] if _several_nodes() else ["--standalone"]
    command = [sys.executable, "-m", "torch.distributed.run", *standalone, "--nproc_per_node", str(nproc),
               "-m", "ftclip", *arguments]
    os.execv(sys.executable, command)


@app.command()
def train(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="The recipe to run.")],
    max_steps: Annotated[int | None, typer.Option(min=1, help="Override max_steps.")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Override output_dir.")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Resume from this checkpoint folder (default: output_dir's latest).")
    ] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Start over even if output_dir has checkpoints.")] = False,
    nproc: Annotated[int | None, typer.Option(min=1, help="Run N processes on this machine via torchrun "
                                                       "(several machines: set torchrun's PET_* variables).")] = None,
    overrides: SetOption = None,
    verify: Annotated[str, typer.Option(
        help="Checkpoint check before resuming: auto (SHA-256 of files up to 64 MiB, size of larger ones) or full "
             "(SHA-256 of every file).")] = "auto",
) -> None:
    """Load the model, LoRA/QLoRA and data, then train with live progress and save the result.

    Continues automatically from the newest intact (verified) checkpoint in output_dir when there is one.
    Several processes: torchrun --nproc_per_node N -m ftclip train RECIPE, or --nproc N."""
    if nproc and (nproc > 1 or _several_nodes()) and "LOCAL_RANK" not in os.environ:
        _exec_torchrun(nproc)
    if not _is_rank_zero():
        console.quiet = True  # rank 0 speaks for the run; errors still reach stderr from every rank
    try:
        # --max-steps/--output-dir are shorthands for --set; an explicit --set of the same key comes later and wins.
        shorthands = ([f"max_steps={max_steps}"] if max_steps is not None else []) + (
            [f"output_dir={json.dumps(output_dir)}"] if output_dir is not None else [])
        recipe = read_recipe(recipe_path, shorthands + (overrides or []))
        _print_import_summary(recipe, console)
        problems, _ = _filesystem_problems(recipe, recipe_path)
        if problems:
            raise RecipeError(problems)
        _quiet_libraries()
        from ftclip.train import train as run_training

        if resume and no_resume:
            raise FtclipError("--resume and --no-resume contradict each other; pass one")
        if resume is None and not no_resume and recipe.resume_from_checkpoint:
            resume = Path(recipe.resume_from_checkpoint)  # the recipe's spelling of --resume
        _check_verify_mode(verify)
        result = run_training(recipe, console, resume=False if no_resume else resume, verify=verify)
    except StorageError as error:
        if _is_rank_zero():
            error_console.print(f"[bold red]error:[/] {user(error)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_STORAGE)
    except OSError as error:
        # A write outside the checkpoint code (metrics, TensorBoard) on a full or read-only disk: the same exit.
        if error.errno not in _STORAGE_ERRNOS:
            raise
        error_console.print(f"[bold red]error:[/] cannot write {user(error.filename or 'to the output folder')}: "
                            f"{user(error.strerror)}. Checkpoints written before are untouched; free space or fix the "
                            "folder's permissions, then run the same command again.", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_STORAGE)
    except PeerLost as error:
        # Every surviving rank says so (the one that speaks for the run may be the one that died), and leaves
        # without finalization: its process group lost a member and cannot be torn down in order.
        error_console.print(f"[bold red]error:[/] {user(error)}", highlight=False, soft_wrap=True)
        _leave_worker(EXIT_PEER_LOST)
        raise typer.Exit(EXIT_PEER_LOST)
    except FtclipError as error:
        _fail(error)
    except RunStopped as stopped:
        if _is_rank_zero():  # the other ranks stopped at the same step; one message
            error_console.print(f"[yellow]stopped[/]: {user(stopped)}", highlight=False)
        _leave_worker(stopped.exit_code)
        raise typer.Exit(stopped.exit_code)
    except KeyboardInterrupt:
        error_console.print("[yellow]interrupted[/]: stopped without saving; the last checkpoint and earlier "
                            "outputs are intact")
        raise typer.Exit(EXIT_INTERRUPTED)
    console.print(f"[green]done[/]: {user(result.artifact)}", highlight=False)
    _leave_worker(0)


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _check_verify_mode(verify: str) -> None:
    from ftclip.checkpoint import VERIFY_MODES

    if verify not in VERIFY_MODES:
        raise FtclipError(f"--verify {verify}: use one of {', '.join(VERIFY_MODES)}")


@app.command()
def checkpoints(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run's output_dir (holds checkpoints/).")],
    verify: Annotated[str, typer.Option(help="auto (SHA-256 of files up to 64 MiB, size of larger ones) or full.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable results.")] = False,
) -> None:
    """List a run's checkpoints: step, size, intact or damaged (which file, expected vs found), and the one
    `ftclip train` would resume from. Exit 2 if RUN_DIR has no checkpoints folder."""
    from rich.table import Table

    from ftclip.checkpoint import CHECKPOINTS, human_bytes, resume_order, step_folders, verify_checkpoint

    try:
        _check_verify_mode(verify)
        if not (run_dir / CHECKPOINTS).is_dir():
            raise FtclipError(f"{run_dir}: no {CHECKPOINTS}/ folder here (is it a run's output_dir?)")
    except FtclipError as error:
        _fail(error)
    checks = [verify_checkpoint(folder, verify) for folder in step_folders(run_dir)]
    intact = {check.path for check in checks if check.intact}
    chosen = next((folder for folder in resume_order(run_dir) if folder in intact), None)
    if as_json:
        print(json.dumps({
            "run_dir": str(run_dir), "resume_from": str(chosen) if chosen else None, "verify": verify,
            "checkpoints": [{"path": str(c.path), "step": c.step, "bytes": c.size, "intact": c.intact,
                             "resume": c.path == chosen, "problems": c.problems, "hashed_files": c.hashed,
                             "size_checked_files": c.size_checked, "unverified": c.legacy} for c in checks],
        }, indent=2, ensure_ascii=False))
        return
    table = Table(title=f"checkpoints: {user(run_dir / CHECKPOINTS)}")
    for column in ("step", "size", "state", "resume"):
        table.add_column(column, justify="right" if column in ("step", "size") else "left")
    for check in checks:
        if check.legacy:
            state = "[yellow]unverified[/] (written without checksums)"
        elif check.intact:
            state = "[green]intact[/]" + (f" ({check.size_checked} large file(s) by size)" if check.size_checked else "")
        else:
            state = "[red]damaged[/]: " + user("; ".join(check.problems))
        table.add_row(str(check.step), human_bytes(check.size), state, "← resume" if check.path == chosen else "")
    console.print(table)
    if chosen is None:
        console.print("no intact checkpoint: `ftclip train` would stop with exit 2 (or start over with --no-resume)"
                      if checks else "no checkpoints: `ftclip train` would start from step 0")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run's output_dir (holds metrics.jsonl).")],
    plot: Annotated[bool, typer.Option(help="Write RUN_DIR/report.png (needs matplotlib: pip install 'ftclip[report]').")] = True,
) -> None:
    """Summarize what clipping did in a run (norm percentiles, clip rate, spikes, skipped steps) and suggest a threshold."""
    from rich.table import Table

    from ftclip.report import PLOT_FILE, analyze, preference_rows, read_history, sparkline, write_plot

    try:
        history = read_history(run_dir)
        result = analyze(history)
    except FtclipError as error:
        _fail(error)
    table = Table(title=f"ftclip report: {user(run_dir)}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("optimizer steps", str(result.steps))
    table.add_row("loss (first → last step)", f"{result.loss_first:.4g} → {result.loss_last:.4g}")
    table.add_row("pre-clip norm", "  ".join(f"{k} {v:.4g}" for k, v in result.percentiles.items()))
    if result.thresholds:
        low, high = result.thresholds
        table.add_row("threshold used", f"{low:.4g}" if low == high else f"{low:.4g} … {high:.4g} (adaptive)")
    table.add_row("clipped steps", f"{result.clipped_steps} of {result.steps} ({result.clipped_steps / result.steps:.0%})")
    table.add_row("skipped (non-finite)", str(result.skipped_steps))
    table.add_row("spikes", ", ".join(
        f"step {s.step} (×{s.norm / s.median_norm:.0f}{', loss jump' if s.loss_jump else ''})" for s in result.spikes
    ) or "none")
    for label, value in preference_rows(history):  # rl / reward_model runs: rewards and log-probabilities
        table.add_row(label, value)
    table.add_row("[bold green]suggested max_norm[/]", f"[bold green]{result.suggested:g}[/]")
    console.print(table)
    for line in result.reasoning:
        console.print(f"  • {user(line)}", highlight=False)
    console.print(f"grad norm (log): {sparkline([s.norm for s in history.steps])}", highlight=False)
    if plot:
        written = write_plot(history, result, Path(run_dir) / PLOT_FILE)
        if written:
            console.print(f"plot: {user(written)}", highlight=False)
        else:
            console.print("no plot: matplotlib is not installed (pip install 'ftclip[report]'); the sparkline above "
                          "is the terminal version")


@app.command()
def preprocess(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="The recipe whose data to tokenize.")],
    show: Annotated[int, typer.Option(min=0, help="Print the first N tokenized examples, trained tokens highlighted.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="With --show: one JSON object per example "
                                          '{"input_ids": [...], "labels": [...]} (-100 = not trained), nothing else.')] = False,
    overrides: SetOption = None,
) -> None:
    """Tokenize (and pack) the recipe's datasets into the on-disk cache, the step `train` then skips; print the
    counts and the speed, and with --show what is trained."""
    import resource
    import time

    try:
        recipe = read_recipe(recipe_path, overrides)
        _print_import_summary(recipe, error_console if as_json else console)  # --json's stdout is JSON alone
        problems, notices = _filesystem_problems(recipe, recipe_path)
        if problems:
            raise RecipeError(problems)
        _quiet_libraries()
        from ftclip.data import prepare
        from ftclip.modeling import load_tokenizer

        tokenizer = load_tokenizer(recipe)
        started = time.perf_counter()
        data = prepare(recipe, tokenizer)
        seconds = time.perf_counter() - started
    except FtclipError as error:
        _fail(error)
    examples = data.examples
    if show:
        from ftclip.show import show_examples

        shown = range(min(show, len(examples)))
        processor = getattr(tokenizer, "ftclip_processor", None)  # image chats: placeholder runs shown as ×N
        if hasattr(examples, "sequences"):  # preference data: each pair's chosen and rejected sequence (or KTO's one)
            pairs = (sequence for i in shown for sequence in examples.sequences(i))
        else:
            pairs = ((examples.input_ids(i).tolist(), examples.labels(i).tolist()) for i in shown)
        show_examples(console, tokenizer, pairs, as_json=as_json,
                      placeholders=frozenset(processor.image_token_ids) if processor else frozenset())
        if as_json:
            return
    for note in data.notes:
        console.print(f"[yellow]warning:[/] {user(note)}", highlight=False)
    trained = int(examples.trained.sum())
    console.print(f"{len(examples):,} examples ({len(data.train.members):,} train, {len(data.val):,} {data.held_out}), "
                  f"{examples.tokens:,} tokens of which {trained:,} trained on; longest {int(examples.lengths.max())} "
                  f"of sequence_len {recipe.sequence_len}", highlight=False)
    if data.packing:
        stats = data.packing
        console.print(f"packing: {stats.examples:,} examples in {stats.rows:,} rows, efficiency {stats.efficiency:.1%}")
    if data.hit:
        console.print(f"cache hit: {user(data.cache)} (opened in {seconds:.2f} s)", highlight=False)
    else:
        console.print(f"tokenized {data.records:,} records in {data.seconds:.1f} s: {data.records / data.seconds:,.0f} "
                      f"records/s, {examples.tokens / data.seconds:,.0f} tokens/s", highlight=False)
        console.print(f"cached: {user(data.cache)}", highlight=False)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    console.print(f"peak memory: {own:,.0f} MB" + (f" (largest child process {workers:,.0f} MB)" if workers else ""),
                  highlight=False)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A LoRA run's output_dir (or an adapter folder).")],
    output: Annotated[Path | None, typer.Option(help="Where to save the merged model (default: RUN_DIR/merged).")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model folder, if it moved since training.")] = None,
    dtype: Annotated[str, typer.Option(help="Precision to save in: auto (as the run trained), bf16, fp16 or fp32.")] = "auto",
) -> None:
    """Merge the LoRA adapter into its base model and save a model that loads with plain transformers."""
    _quiet_libraries()
    from ftclip.merge import merge_adapter

    try:
        saved = merge_adapter(run_dir, output, base_model, dtype,
                              report=lambda message: console.print(user(message), highlight=False))
    except FtclipError as error:
        _fail(error)
    architectures = json.loads((saved / "config.json").read_text()).get("architectures") or []
    if (saved / "processor_config.json").is_file():
        loads = "AutoModelForImageTextToText and AutoProcessor"
    elif any(name.endswith("ForSequenceClassification") for name in architectures):
        loads = "AutoModelForSequenceClassification"  # a reward model keeps its score head
    else:
        loads = "AutoModelForCausalLM"
    console.print(f"[green]merged[/]: {user(saved)}  ({user(f'{loads}.from_pretrained({str(saved)!r})')})", highlight=False)


@app.command()
def chat(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR|MODEL_DIR",
                                            help="A run's output_dir, or an adapter, merged or model folder.")],
    prompt: Annotated[str | None, typer.Option(help="Answer this once, print the reply and exit (for scripts).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0, help="0: greedy (the same reply every time); >0: sample.")] = 0.0,
    base_model: Annotated[str | None, typer.Option(help="Base model folder, if it moved since training.")] = None,
    image: Annotated[Path | None, typer.Option(help="A vision-language run: the image the conversation is about.")] = None,
) -> None:
    """Talk to what a run trained: base model + adapter (or a merged/full model), prompts formatted as in training
    (chat template, or alpaca for alpaca data), replies streamed. Interactive unless --prompt; chat turns keep history."""
    import sys

    _quiet_libraries()
    from ftclip.inference import (
        Conversation,
        chat_image,
        find_chat_source,
        load_for_chat,
        prompt_format_of,
        prompt_style,
        refuse_reward_model,
        reply,
    )

    try:
        source = find_chat_source(run_dir, base_model)
        refuse_reward_model(source)
        model, tokenizer = load_for_chat(source, trust_remote_code=bool(source.recipe.get("trust_remote_code")))
        processor = getattr(tokenizer, "ftclip_processor", None)
        picture = chat_image(image, source.recipe, processor) if image is not None else None
    except FtclipError as error:
        _fail(error)
    conversation = Conversation(tokenizer, prompt_style(source.recipe, tokenizer), processor=processor, image=picture,
                                prompt_format=prompt_format_of(source.recipe))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if prompt is not None:
        reply(model, tokenizer, conversation, prompt, max_new_tokens, temperature, write)
        write("\n")
        return
    loaded = f"{source.base_model} + adapter {source.folder}" if source.base_model else str(source.folder)
    console.print(f"[bold]ftclip chat[/]: {user(loaded)}, {conversation.style} prompts. /reset forgets the conversation; "
                  "/quit or Ctrl-D ends it.", highlight=False)
    while True:
        try:
            message = console.input("[bold cyan]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if message in ("/quit", "/exit"):
            break
        if message == "/reset":
            conversation.turns.clear()
            continue
        if message:
            console.print("[bold green]model>[/] ", end="")
            reply(model, tokenizer, conversation, message, max_new_tokens, temperature, write)
            write("\n")
    write("\n")


@app.command()
def schema() -> None:
    """Print the recipe's JSON Schema (point your editor's YAML plugin at it)."""
    print(json.dumps(Recipe.model_json_schema(), indent=2))




@app.command("import-axolotl")
def import_axolotl(
    configs: Annotated[list[Path], typer.Argument(metavar="IN.yml...", help="Axolotl config files.", show_default=False)],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where to write the recipe (one input only).")] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="Folder for the recipes (default: next to each input).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Convert Axolotl configs to ftclip recipes, with a per-key report: mapped, dropped (no effect on what is
    trained), refused (changes training; nothing is written for that config). Each config is reported even when
    another fails. Exit 2 if any was not written; 1 if the importer failed unexpectedly on any (that config is
    reported with the error; the others are still converted)."""
    from ftclip.axolotl import output_paths

    if output is not None and (len(configs) > 1 or output_dir is not None):
        _fail(FtclipError("-o names one output file: pass one config, or use --output-dir for several"))
    results = []
    for source, target in zip(configs, output_paths(configs, output, output_dir)):
        result = _import_one(source, target)
        results.append(result)
        if not as_json:
            _report_import(result)
    if as_json:
        print(json.dumps([result.as_json() for result in results], indent=2))
    written = sum(result.ok for result in results)
    if not as_json and len(results) > 1:
        failed = sum(result.failure is not None for result in results)
        console.print(f"{written} of {len(results)} configs written" + (f", {failed} failed" if failed else ""),
                      highlight=False)
    if any(result.failure is not None for result in results):
        raise typer.Exit(EXIT_FAILED)
    if written < len(results):
        raise typer.Exit(EXIT_BAD_INPUT)


def _import_one(source: Path, target: Path):
    """One config's import and write. Never raises: an unexpected error (an importer bug, or a file no parser
    expects) becomes that config's failure, so the configs after it are still converted and reported."""
    from ftclip.axolotl import ImportResult, import_config, write_atomically

    try:
        result = import_config(source, target)
        if result.ok:
            try:
                write_atomically(target, result.text)
            except OSError as error:
                result.problems.append(f"cannot write {target}: {error}")
    except Exception as error:  # reported for this config; the next one runs
        result = ImportResult(str(source), str(target), failure=f"{type(error).__name__}: {error}")
    return result


def _report_import(result) -> None:
    try:
        _print_import(result)
    except Exception as error:  # printing one report must not stop the others
        result.failure = f"{type(error).__name__} while printing its report: {error}"
        error_console.print(f"failed {result.source}: {result.failure}", markup=False, highlight=False)


def _print_import(result) -> None:
    if result.ok:
        kind = " (already an ftclip recipe: copied unchanged)" if result.native else ""
        console.print(f"[green]written[/] {user(result.output)}  ← {user(result.source)}{kind}", highlight=False)
    elif result.refused:
        console.print(f"[red]refused[/] {user(result.source)}: nothing written", highlight=False)
    elif result.failure is not None:
        console.print(f"[bold red]failed[/] {user(result.source)}: the importer failed unexpectedly, nothing written: "
                      f"{user(result.failure)}", highlight=False, soft_wrap=True)
        return
    else:
        console.print(f"[red]invalid[/] {user(result.source)}: nothing written", highlight=False)
    if result.native:
        return
    for old, new, note in result.mapped:
        console.print(f"  mapped   {user(old)} → {user(new)}" + (f"  ({user(note)})" if note else ""), highlight=False,
                      soft_wrap=True)
    for key, why in result.dropped:
        console.print(f"  dropped  {user(key)}: {user(why)}", highlight=False, soft_wrap=True)
    for key, why in result.refused:
        console.print(f"  [red]refused[/]  {user(key)}: {user(why)}", highlight=False, soft_wrap=True)
    for problem in result.problems:
        console.print(f"  [red]problem[/]  {user(problem)}", highlight=False, soft_wrap=True)
