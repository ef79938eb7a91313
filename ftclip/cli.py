"""The command line: the only place that turns ftclip's errors into messages and exit codes
(0 ok, 1 run stopped because it diverged, 2 bad input, 3 storage failure: a checkpoint or the result could not
be written (disk full, read-only or permission denied; earlier checkpoints intact), 130/143 stopped by
SIGINT/SIGTERM)."""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ftclip.errors import FtclipError, Problem, RecipeError, RunStopped, StorageError
from ftclip.recipe import Recipe, load_recipe

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune LLMs (LoRA, QLoRA, full) from YAML recipes, with a fast and visible gradient clip.",
)
console = Console()
error_console = Console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_STORAGE = 3
EXIT_INTERRUPTED = 130


def _fail(error: FtclipError) -> None:
    error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _quiet_libraries() -> None:
    # transformers' per-file progress bars and advisories would drown ftclip's own progress view.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # peft calls a transformers method that transformers 5 deprecated; the advice is for peft, not users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _filesystem_problems(recipe: Recipe, path: Path) -> list[Problem]:
    """Checks that look at disk but load no weights: data files parse, model folders and ids make sense."""
    from ftclip.data import check_datasets
    from ftclip.modeling import check_model_source
    from ftclip.recipe import key_line

    found = check_datasets(recipe, path) + check_model_source(recipe, path)
    return [Problem(str(path), key, message, key_line(path, key)) for key, message in found]


def _notices(recipe: Recipe) -> list[str]:
    """Valid, but worth a word: settings that run foreign code, or that this machine cannot run."""
    import torch

    from ftclip.optim import optimizer_device_problem

    notices = ["trust_remote_code: true runs code shipped with the model"] if recipe.trust_remote_code else []
    problem = optimizer_device_problem(recipe, torch.cuda.is_available())
    if problem:  # device: cpu is an error already; auto/cuda may be meant for another machine
        notices.append(f"optimizer: {problem} — `ftclip train` will refuse it here")
    return notices


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files to check.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable results.")] = False,
) -> None:
    """Check recipes without loading weights: schema, combinations, data files, model paths. Exit 2 if any is invalid."""
    results = []
    for path in recipes:
        try:
            recipe = load_recipe(path)
            problems = _filesystem_problems(recipe, path)
            notices = _notices(recipe)
        except RecipeError as error:
            problems, notices = error.problems, []
        results.append({"file": str(path), "valid": not problems, "problems": problems, "warnings": notices})
    if as_json:
        payload = [
            {**r, "problems": [{"line": p.line, "key": p.key, "message": p.message} for p in r["problems"]]}
            for r in results
        ]
        print(json.dumps(payload, indent=2))
    else:
        for result in results:
            if result["valid"]:
                console.print(f"[green]ok[/]      {result['file']}", highlight=False)
            else:
                console.print(f"[red]invalid[/] {result['file']}", highlight=False)
                for problem in result["problems"]:
                    console.print(f"  {problem}", highlight=False, soft_wrap=True)
            for notice in result["warnings"]:
                console.print(f"  [yellow]warning:[/] {notice}", highlight=False)
    if not all(result["valid"] for result in results):
        raise typer.Exit(EXIT_BAD_INPUT)


def _is_rank_zero() -> bool:
    """True outside torchrun too; torchrun sets RANK for each worker."""
    return int(os.environ.get("RANK", "0")) == 0


def _exec_torchrun(nproc: int) -> None:
    """Replace this process with torchrun running the same command in N processes (torch's launcher)."""
    import sys

    arguments = sys.argv[1:]
    for index, value in enumerate(arguments):  # drop --nproc N / --nproc=N so the workers don't re-launch
        if value == "--nproc":
            del arguments[index:index + 2]
            break
        if value.startswith("--nproc="):
            del arguments[index]
            break
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "ftclip", *arguments]
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
    nproc: Annotated[int | None, typer.Option(min=1, help="Run N processes on this machine via torchrun.")] = None,
    verify: Annotated[str, typer.Option(
        help="Checkpoint check before resuming: auto (SHA-256 of files up to 64 MiB, size of larger ones) or full "
             "(SHA-256 of every file).")] = "auto",
) -> None:
    """Load the model, LoRA/QLoRA and data, then train with live progress and save the result.

    Continues automatically from the newest intact (verified) checkpoint in output_dir when there is one.
    Several processes: torchrun --nproc_per_node N -m ftclip train RECIPE, or --nproc N."""
    if nproc and nproc > 1 and "LOCAL_RANK" not in os.environ:
        _exec_torchrun(nproc)
    if not _is_rank_zero():
        console.quiet = True  # rank 0 speaks for the run; errors still reach stderr from every rank
    try:
        recipe = load_recipe(recipe_path)
        overrides = {k: v for k, v in {"max_steps": max_steps, "output_dir": output_dir}.items() if v is not None}
        if overrides:
            recipe = recipe.model_copy(update=overrides)
        problems = _filesystem_problems(recipe, recipe_path)
        if problems:
            raise RecipeError(problems)
        _quiet_libraries()
        from ftclip.train import train as run_training

        if resume and no_resume:
            raise FtclipError("--resume and --no-resume contradict each other; pass one")
        _check_verify_mode(verify)
        result = run_training(recipe, recipe_path, console, resume=False if no_resume else resume, verify=verify)
    except StorageError as error:
        if _is_rank_zero():
            error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_STORAGE)
    except OSError as error:
        # A write outside the checkpoint code (metrics, TensorBoard) on a full or read-only disk: the same exit.
        if error.errno not in _STORAGE_ERRNOS:
            raise
        error_console.print(f"[bold red]error:[/] cannot write {error.filename or 'to the output folder'}: "
                            f"{error.strerror}. Checkpoints written before are untouched; free space or fix the "
                            "folder's permissions, then run the same command again.", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_STORAGE)
    except FtclipError as error:
        _fail(error)
    except RunStopped as stopped:
        if _is_rank_zero():  # the other ranks stopped at the same step; one message
            error_console.print(f"[yellow]stopped[/]: {stopped}", highlight=False)
        raise typer.Exit(stopped.exit_code)
    except KeyboardInterrupt:
        error_console.print("[yellow]interrupted[/]: stopped without saving; the last checkpoint and earlier "
                            "outputs are intact")
        raise typer.Exit(EXIT_INTERRUPTED)
    console.print(f"[green]done[/]: {result.artifact}")


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
    table = Table(title=f"checkpoints: {run_dir / CHECKPOINTS}")
    for column in ("step", "size", "state", "resume"):
        table.add_column(column, justify="right" if column in ("step", "size") else "left")
    for check in checks:
        if check.legacy:
            state = "[yellow]unverified[/] (written without checksums)"
        elif check.intact:
            state = "[green]intact[/]" + (f" ({check.size_checked} large file(s) by size)" if check.size_checked else "")
        else:
            state = "[red]damaged[/]: " + "; ".join(check.problems)
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

    from ftclip.report import PLOT_FILE, analyze, read_history, sparkline, write_plot

    try:
        history = read_history(run_dir)
        result = analyze(history)
    except FtclipError as error:
        _fail(error)
    table = Table(title=f"ftclip report: {run_dir}", show_header=False)
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
    table.add_row("[bold green]suggested max_norm[/]", f"[bold green]{result.suggested:g}[/]")
    console.print(table)
    for line in result.reasoning:
        console.print(f"  • {line}", highlight=False)
    console.print(f"grad norm (log): {sparkline([s.norm for s in history.steps])}", highlight=False)
    if plot:
        written = write_plot(history, result, Path(run_dir) / PLOT_FILE)
        if written:
            console.print(f"plot: {written}")
        else:
            console.print("no plot: matplotlib is not installed (pip install 'ftclip[report]'); the sparkline above "
                          "is the terminal version")


@app.command()
def preprocess(recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="The recipe whose data to tokenize.")]) -> None:
    """Tokenize the recipe's datasets into the on-disk cache (the step `train` then skips), and show the numbers."""
    try:
        recipe = load_recipe(recipe_path)
        problems = _filesystem_problems(recipe, recipe_path)
        if problems:
            raise RecipeError(problems)
        _quiet_libraries()
        from ftclip.batching import pack_examples
        from ftclip.data import split_examples
        from ftclip.data_cache import cached_examples
        from ftclip.modeling import load_tokenizer
        from ftclip.progress import tokenizing_progress

        tokenizer = load_tokenizer(recipe, recipe_path)
        outcome = {}
        examples = cached_examples(recipe, recipe_path, tokenizer, tokenizing_progress(console),
                                   report=lambda path, hit: outcome.update(path=path, hit=hit))
        train_examples, val_examples = split_examples(examples, recipe)
    except FtclipError as error:
        _fail(error)
    tokens = sum(len(e.input_ids) for e in examples)
    trained = sum(e.trained_tokens for e in examples)
    console.print(f"{len(examples)} examples ({len(train_examples)} train, {len(val_examples)} held out), "
                  f"{tokens:,} tokens of which {trained:,} trained on; longest {max(len(e.input_ids) for e in examples)} "
                  f"of sequence_len {recipe.sequence_len}", highlight=False)
    if recipe.sample_packing:
        _, stats = pack_examples(train_examples, recipe.sequence_len)
        console.print(f"packing: {stats.examples} examples in {stats.rows} rows, efficiency {stats.efficiency:.0%}")
    console.print(("cache hit" if outcome["hit"] else "cached") + f": {outcome['path']}", highlight=False)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A LoRA run's output_dir (or an adapter folder).")],
    output: Annotated[Path | None, typer.Option(help="Where to save the merged model (default: RUN_DIR/merged).")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model folder, if it moved since training.")] = None,
) -> None:
    """Merge the LoRA adapter into its base model and save a model that loads with plain transformers."""
    _quiet_libraries()
    from ftclip.merge import merge_adapter

    try:
        saved = merge_adapter(run_dir, output, base_model)
    except FtclipError as error:
        _fail(error)
    console.print(f"[green]merged[/]: {saved}  (AutoModelForCausalLM.from_pretrained({str(saved)!r}))", highlight=False)


@app.command()
def schema() -> None:
    """Print the recipe's JSON Schema (point your editor's YAML plugin at it)."""
    print(json.dumps(Recipe.model_json_schema(), indent=2))


