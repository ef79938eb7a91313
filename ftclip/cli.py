"""The command line: the only place that turns ftclip's errors into messages and exit codes
(0 ok, 1 run stopped because it diverged, 2 bad input, 130/143 stopped by SIGINT/SIGTERM)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ftclip.errors import FtclipError, Problem, RecipeError, RunStopped
from ftclip.overrides import load_recipe_with_overrides
from ftclip.recipe import Recipe

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune LLMs (LoRA, QLoRA, full) from YAML recipes, with a fast and visible gradient clip.",
)
console = Console()
error_console = Console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", show_default=False,
                 help="Override a recipe key before validation (dotted key, YAML value; repeatable), "
                      "e.g. --set learning_rate=1e-4 --set datasets.0.path=data.jsonl."),
]


def _fail(error: FtclipError) -> None:
    error_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
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
    from ftclip.overrides import blame, recipe_overrides
    from ftclip.recipe import key_line
    from ftclip.trackers import tracker_problems

    found = check_datasets(recipe, path) + check_model_source(recipe, path) + tracker_problems(recipe)
    return blame([Problem(str(path), key, message, key_line(path, key)) for key, message in found], recipe_overrides(recipe))


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
    overrides: SetOption = None,
) -> None:
    """Check recipes without loading weights: schema, combinations, data files, model paths. Exit 2 if any is invalid."""
    results = []
    for path in recipes:
        try:
            recipe = load_recipe_with_overrides(path, overrides)
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
                    console.print(f"  {escape(str(problem))}", highlight=False, soft_wrap=True)
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
    overrides: SetOption = None,
) -> None:
    """Load the model, LoRA/QLoRA and data, then train with live progress and save the result.

    Continues automatically from the latest complete checkpoint in output_dir when there is one.
    Several processes: torchrun --nproc_per_node N -m ftclip train RECIPE, or --nproc N."""
    if nproc and nproc > 1 and "LOCAL_RANK" not in os.environ:
        _exec_torchrun(nproc)
    if not _is_rank_zero():
        console.quiet = True  # rank 0 speaks for the run; errors still reach stderr from every rank
    try:
        # --max-steps/--output-dir are shorthands for --set; an explicit --set of the same key comes later and wins.
        shorthands = ([f"max_steps={max_steps}"] if max_steps is not None else []) + (
            [f"output_dir={json.dumps(output_dir)}"] if output_dir is not None else [])
        recipe = load_recipe_with_overrides(recipe_path, shorthands + (overrides or []))
        problems = _filesystem_problems(recipe, recipe_path)
        if problems:
            raise RecipeError(problems)
        _quiet_libraries()
        from ftclip.train import train as run_training

        if resume and no_resume:
            raise FtclipError("--resume and --no-resume contradict each other; pass one")
        result = run_training(recipe, recipe_path, console, resume=False if no_resume else resume)
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
def preprocess(recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="The recipe whose data to tokenize.")],
               overrides: SetOption = None) -> None:
    """Tokenize the recipe's datasets into the on-disk cache (the step `train` then skips), and show the numbers."""
    try:
        recipe = load_recipe_with_overrides(recipe_path, overrides)
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
    dtype: Annotated[str, typer.Option(help="Precision to save in: auto (as the run trained), bf16, fp16 or fp32.")] = "auto",
) -> None:
    """Merge the LoRA adapter into its base model and save a model that loads with plain transformers."""
    _quiet_libraries()
    from ftclip.merge import merge_adapter

    try:
        saved = merge_adapter(run_dir, output, base_model, dtype,
                              report=lambda message: console.print(message, highlight=False))
    except FtclipError as error:
        _fail(error)
    console.print(f"[green]merged[/]: {saved}  (AutoModelForCausalLM.from_pretrained({str(saved)!r}))", highlight=False)


@app.command()
def chat(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR|MODEL_DIR",
                                            help="A run's output_dir, or an adapter, merged or model folder.")],
    prompt: Annotated[str | None, typer.Option(help="Answer this once, print the reply and exit (for scripts).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0, help="0: greedy (the same reply every time); >0: sample.")] = 0.0,
    base_model: Annotated[str | None, typer.Option(help="Base model folder, if it moved since training.")] = None,
) -> None:
    """Talk to what a run trained: base model + adapter (or a merged/full model), prompts formatted as in training
    (chat template, or alpaca for alpaca data), replies streamed. Interactive unless --prompt; chat turns keep history."""
    import sys

    _quiet_libraries()
    from ftclip.inference import Conversation, find_chat_source, load_for_chat, prompt_style, reply

    try:
        source = find_chat_source(run_dir, base_model)
        model, tokenizer = load_for_chat(source, trust_remote_code=bool(source.recipe.get("trust_remote_code")))
    except FtclipError as error:
        _fail(error)
    conversation = Conversation(tokenizer, prompt_style(source.recipe, tokenizer))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if prompt is not None:
        reply(model, tokenizer, conversation, prompt, max_new_tokens, temperature, write)
        write("\n")
        return
    loaded = f"{source.base_model} + adapter {source.folder}" if source.base_model else str(source.folder)
    console.print(f"[bold]ftclip chat[/]: {loaded}, {conversation.style} prompts. /reset forgets the conversation; "
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


