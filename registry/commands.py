"""CLI verbs of the adapter zoo: list, show, publish, push, pull, merge, export, delete, check, gc.

Registered onto the main ``adamix-zoo`` app; heavy imports stay inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

HUB = "hf://"
STORE_HELP = "Store folder (default: $ADAMIX_ZOO_HOME or ~/.cache/adamix-zoo)."


def _store(path: Optional[Path]):
    from registry.store import Store

    return Store(path)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _metric(info_tasks: dict) -> str:
    parts = []
    for task, info in info_tasks.items():
        metrics = info.get("metrics") or {}
        main = metrics.get("main_metric")
        value = metrics.get(main) if main else None
        parts.append(f"{task}: {main}={value:.4g}" if isinstance(value, float) else task)
    return ", ".join(parts)


def list_entries(
    namespace: Optional[str] = typer.Option(None, help="Only this namespace."),
    task: Optional[str] = typer.Option(None, help="Only this task."),
    store: Optional[Path] = typer.Option(None, help=STORE_HELP),
) -> None:
    """List the published entries.

    Example: `adamix-zoo list --task sst2`
    """
    from rich.console import Console
    from rich.table import Table

    zoo = _store(store)
    table = Table(title=f"adamix-zoo store {zoo.root}")
    for column in ("entry", "method", "kind", "base model", "tasks / main metric", "created"):
        table.add_column(column)
    damaged = 0
    for info in zoo.list(namespace, task):
        try:
            tasks = _metric(zoo.show(info.ref)["tasks"])
        except ValueError as err:  # report a damaged entry, keep listing the others
            damaged += 1
            tasks = f"[red]DAMAGED: {err}[/red]"
        table.add_row(info.ref, info.method, info.kind, info.base_model or "-", tasks, info.created)
    Console().print(table)
    if damaged:
        typer.secho(f"{damaged} damaged entr{'y' if damaged == 1 else 'ies'}: run `adamix-zoo check` "
                    "(and `adamix-zoo check --repair`)", fg=typer.colors.YELLOW, err=True)


def check(
    repair: bool = typer.Option(False, "--repair", help="Quarantine damaged entries, forget missing "
                                "ones, rebuild an unreadable index from the entry folders."),
    store: Optional[Path] = typer.Option(None, help=STORE_HELP),
) -> None:
    """Verify every entry (index, adamix.json, sha256 of every file); exit 1 if something is wrong.

    Examples: `adamix-zoo check` · `adamix-zoo check --repair`
    """
    zoo = _store(store)
    problems = zoo.check()
    for problem in problems:
        typer.echo(f"damaged: {problem}")
    if repair and problems:
        for line in zoo.repair():
            typer.echo(f"repaired: {line}")
        problems = zoo.check()
    garbage = zoo.garbage() if zoo.index_error is None else []
    if garbage:
        typer.echo(f"{len(garbage)} leftover folder(s) no entry uses: `adamix-zoo gc` removes them")
    if problems:
        raise typer.Exit(code=1)
    typer.echo(f"store {zoo.root}: {len(zoo.list())} entries, all verified")


def gc(
    min_age: float = typer.Option(60.0, help="Keep staging folders younger than this (seconds)."),
    store: Optional[Path] = typer.Option(None, help=STORE_HELP),
) -> None:
    """Remove leftovers: stale staging folders and entry folders no index row points to.

    Example: `adamix-zoo gc`
    """
    removed = _store(store).gc(min_age_s=min_age)
    for path in removed:
        typer.echo(f"removed {path}")
    typer.echo(f"{len(removed)} folder(s) removed")


def show(
    ref: str = typer.Argument(..., help="namespace/task@version (version default: latest)."),
    as_json: bool = typer.Option(False, "--json", help="Print adamix.json."),
    store: Optional[Path] = typer.Option(None, help=STORE_HELP),
) -> None:
    """Show an entry's metadata and files.

    Example: `adamix-zoo show local/sst2@latest`
    """
    from rich.console import Console
    from rich.table import Table

    try:
        zoo = _store(store)
        info, meta = zoo.resolve(ref), zoo.show(ref)
    except (KeyError, ValueError) as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(meta, indent=2, sort_keys=True))
        return
    table = Table(title=info.ref, show_header=False)
    rows = [("path", str(info.path)), ("method", meta["method"]), ("kind", meta["kind"]),
            ("experts K", str(meta["num_experts"])),
            ("rank / bottleneck", str(meta.get("rank") or meta.get("bottleneck"))),
            ("sharing", str(meta.get("sharing"))), ("merge", json.dumps(meta["merge"], sort_keys=True)),
            ("base model", f"{meta['base_model'].get('id')} ({meta['base_model']['fingerprint'][:16]}...)"),
            ("tasks", _metric(meta["tasks"]))]
    rows += [(f"file {name}", digest[:16] + "...") for name, digest in sorted(meta["files"].items())]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def publish(
    run_dir: Path = typer.Argument(..., help="A training output folder (run_config.json, merged/, ...)."),
    task: Optional[str] = typer.Option(None, help="Entry task name (default: the run's task)."),
    namespace: str = typer.Option("local", help="Entry namespace."),
    version: Optional[str] = typer.Option(None, help="Explicit version (default: next integer)."),
    experts: bool = typer.Option(True, help="Keep the unmerged experts in the entry."),
    store: Optional[Path] = typer.Option(None, help=STORE_HELP),
) -> None:
    """Publish a training output folder as an immutable entry.

    Example: `adamix-zoo publish out/sst2 --namespace glue`
    """
    try:
        info = _store(store).publish(run_dir, task=task, namespace=namespace, version=version,
                                     experts=experts)
    except (KeyError, ValueError) as err:
        _fail(err)
    typer.echo(f"published {info.ref} -> {info.path}")


def push(
    ref: str = typer.Argument(..., help="The entry to push."),
    destination: str = typer.Argument(..., help="hf://user/repo (Hugging Face Hub) or a registry folder."),
    revision: Optional[str] = typer.Option(None, help="Hub branch to commit to."),
    private: bool = typer.Option(False, help="Create the Hub repository private."),
    store: Optional[Path] = typer.Option(None, help=STORE_HELP),
) -> None:
    """Push an entry to a Hub model repository (token: HF_TOKEN) or to another registry folder.

    Examples: `adamix-zoo push glue/sst2@1 hf://alice/minilm-sst2-adamix` ·
    `adamix-zoo push glue/sst2@1 /mnt/team-zoo`
    """
    from registry.remote import push_folder, push_hub

    zoo = _store(store)
    try:
        if destination.startswith(HUB):
            sha = push_hub(zoo, ref, destination[len(HUB):], revision=revision, private=private)
            typer.echo(f"pushed {zoo.resolve(ref).ref} to {destination} at commit {sha}")
        else:
            info = push_folder(zoo, ref, destination)
            typer.echo(f"pushed {info.ref} to {destination}")
    except (KeyError, ValueError) as err:
        _fail(err)


def pull(
    source: str = typer.Argument(..., help="hf://user/repo or a registry folder."),
    ref: Optional[str] = typer.Argument(None, help="The entry, when pulling from a registry folder."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit sha (a sha pins it)."),
    namespace: Optional[str] = typer.Option(None, help="Store it under this namespace."),
    store: Optional[Path] = typer.Option(None, help=STORE_HELP),
) -> None:
    """Pull an entry into the local store; every file's sha256 is verified.

    Examples: `adamix-zoo pull hf://alice/minilm-sst2-adamix --revision 3f2a...` ·
    `adamix-zoo pull /mnt/team-zoo glue/sst2@latest`
    """
    from registry.remote import pull_folder, pull_hub

    zoo = _store(store)
    try:
        if source.startswith(HUB):
            info = pull_hub(zoo, source[len(HUB):], revision=revision, namespace=namespace)
        elif ref is None:
            raise ValueError("pulling from a registry folder needs the entry: adamix-zoo pull FOLDER REF")
        else:
            info = pull_folder(zoo, ref, source, namespace=namespace)
    except (KeyError, ValueError) as err:
        _fail(err)
    typer.echo(f"pulled {info.ref} -> {info.path}")


def merge(
    refs: list[str] = typer.Argument(..., help="Two or more entries of the same base model."),
    method: str = typer.Option("linear", help="linear, ties, dare_linear, dare_ties, magnitude_prune, cat, "
                               "svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd."),
    weights: Optional[str] = typer.Option(None, help="Comma-separated, one per entry (default: 1/n each)."),
    density: Optional[float] = typer.Option(None, help="Kept fraction for TIES / DARE / magnitude pruning."),
    svd_rank: Optional[int] = typer.Option(None, help="Rank of the svd methods' result."),
    seed: int = typer.Option(0, help="Seed of DARE's random masks."),
    task: Optional[str] = typer.Option(None, help="Name of the merged entry (default: tasks joined by '+')."),
    namespace: str = typer.Option("local", help="Namespace of the merged entry."),
    store: Optional[Path] = typer.Option(None, help=STORE_HELP),
) -> None:
    """Merge entries across tasks into one multi-task entry (each task keeps its head).

    `cat` and `svd` (with svd-rank >= the sum of ranks) are exact in LoRA delta-W space; `linear`,
    `ties` and `dare_*` combine the A and B factors separately, as PEFT does.

    Example: `adamix-zoo merge glue/sst2 glue/rte --method ties --density 0.5`
    """
    from registry.merging import merge_entries, parse_weights

    try:
        info = merge_entries(_store(store), refs, parse_weights(weights), method, density, svd_rank,
                             seed=seed, task=task, namespace=namespace)
    except (KeyError, ValueError) as err:
        _fail(err)
    typer.echo(f"merged {', '.join(refs)} -> {info.ref}")


def export(
    ref: str = typer.Argument(..., help="A mixture-of-LoRA entry."),
    destination: Path = typer.Argument(..., help="An empty or new folder."),
    store: Optional[Path] = typer.Option(None, help=STORE_HELP),
) -> None:
    """Write a plain PEFT LoRA folder (loads with `PeftModel.from_pretrained`).

    Example: `adamix-zoo export glue/sst2@1 ./sst2-peft`
    """
    from registry.export import export_peft

    try:
        out = export_peft(_store(store), ref, destination)
    except (KeyError, ValueError) as err:
        _fail(err)
    typer.echo(f"exported {ref} -> {out}")


def delete(
    ref: str = typer.Argument(..., help="namespace/task@version; its version is never reused."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    store: Optional[Path] = typer.Option(None, help=STORE_HELP),
) -> None:
    """Delete an entry.

    Example: `adamix-zoo delete local/sst2@1 --yes`
    """
    zoo = _store(store)
    try:
        info = zoo.resolve(ref)
        if not yes:
            typer.confirm(f"delete {info.ref}?", abort=True)
        zoo.delete(info.ref)
    except (KeyError, ValueError) as err:
        _fail(err)
    typer.echo(f"deleted {info.ref}")


def register(app: typer.Typer) -> None:
    """Add the zoo's verbs to ``app``."""
    app.command("list")(list_entries)
    for command in (show, publish, push, pull, merge, export, delete, check, gc):
        app.command()(command)
