"""``pvit serve``: serve the project's flows from this process, the quick local setup.

``prefect.serve`` runs one process that polls the Prefect API for runs of these
deployments and executes them here: no work pool, no worker (``prefect.yaml`` is the
path for work pools). With an experiment file, each deployment's ``config``
parameter defaults to that file's section, so a run needs no parameters at all::

    prefect server start &                      # once, in another terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    pvit serve configs/demo.yaml
    prefect deployment run generate_dataset/synthetic-dataset

Flows are imported one by one and tolerantly: a flow module that does not exist in
this checkout is skipped with a note, so ``pvit serve`` works whatever subset exists.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from flows.cli_common import SetOpt, console, fail, load_or_exit

# prefect (serve, PREFECT_API_URL) and httpx stay inside the functions: importing them takes
# 0.67-0.75 s (python -X importtime after flows.cli), and flows/cli.py imports this module
# for every `pvit` command (`pvit --help` takes 0.3 s).

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

    from flows.experiment import ExperimentConfig

# (flow name, module, attribute, experiment section that is its `config`; None = all)
FLOWS: list[tuple[str, str, str, str | None]] = [
    ("generate_dataset", "flows.generate", "generate_dataset", "generation"),
    ("pretrain", "flows.train", "pretrain", "pretrain"),
    ("finetune", "flows.train", "finetune", "finetune"),
    ("evaluate", "flows.train", "evaluate", "evaluate"),
    ("humanoid_actions", "flows.actions", "humanoid_actions", "humanoid_actions"),
    ("pipeline", "flows.pipeline", "pipeline", None),
]
# What a user sees in the deployments list: a name and a description per flow, written
# for the person starting a run (the flows' docstrings are for their readers).
DEPLOYMENTS: dict[str, tuple[str, str]] = {
    "generate_dataset": ("synthetic-dataset", "Render synthetic clips with exact labels into "
                         "WebDataset shards (only what is missing; a rerun renders nothing)."),
    "pretrain": ("prompt-pretraining", "Pretrain PViT's prompt tokens on a synthetic dataset "
                 "(reused when the config and the shards are unchanged)."),
    "finetune": ("fine-tuning", "Fine-tune on the downstream video set, with synthetic "
                 "batches mixed in (reused when nothing it reads changed)."),
    "evaluate": ("evaluation", "Top-1/top-5 of a fine-tuned checkpoint, single and "
                 "multi-view (reused for an unchanged checkpoint and split)."),
    "humanoid_actions": ("action-set", "Render the humanoid action set (one actor playing "
                         "one motion per clip) and write it as videos: a downstream task."),
    "pipeline": ("full-pipeline", "Generate, pretrain, fine-tune and evaluate, each stage "
                 "cached on what determines it: a rerun computes only what changed."),
}
FLOW_NAMES = [name for name, *_ in FLOWS]


def load_flows(names: list[str] | None = None) -> tuple[dict[str, Flow], dict[str, str]]:
    """Import the flows called ``names`` (default: all). Returns (flows by name, reasons
    for those skipped). Only a missing module or attribute is skipped; any other import
    error is a bug and propagates."""
    wanted = names or FLOW_NAMES
    unknown = sorted(set(wanted) - set(FLOW_NAMES))
    if unknown:
        raise ValueError(f"unknown flow(s) {unknown} (known: {FLOW_NAMES})")
    loaded, skipped = {}, {}
    for name, module_name, attr, _ in FLOWS:
        if name not in wanted:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            skipped[name] = f"{module_name} does not exist in this checkout"
            continue
        flow = getattr(module, attr, None)
        if flow is None:
            skipped[name] = f"{module_name} defines no {attr}"
            continue
        loaded[name] = flow
    return loaded, skipped


def default_parameters(name: str, experiment: ExperimentConfig | None) -> dict:
    """The flow's ``config`` default taken from the experiment file (empty without one,
    or when the file has no section for this flow)."""
    if experiment is None:
        return {}
    section = next(section for flow, _, _, section in FLOWS if flow == name)
    value = experiment if section is None else getattr(experiment, section)
    if value is None:
        return {}
    return {"config": value.model_dump(mode="json")}


def build_deployments(flows: dict[str, Flow], experiment: ExperimentConfig | None = None,
                      name: str | None = None) -> list[RunnerDeployment]:
    """One deployment per flow, named ``<flow>/<its deployment name>`` (``DEPLOYMENTS``)
    or ``<flow>/<name>`` when a name is given, with a description for its users."""
    return [flow.to_deployment(name=name or DEPLOYMENTS[flow_name][0],
                               description=DEPLOYMENTS[flow_name][1],
                               parameters=default_parameters(flow_name, experiment),
                               tags=["pvit", "serve"])
            for flow_name, flow in flows.items()]


def api_problem(url: str, timeout_s: float = 10.0) -> str | None:
    """Why the Prefect API at ``url`` cannot be served on (one line), or None. Asked
    once before serving: ``prefect.serve`` would otherwise end in a long ConnectError
    traceback."""
    import httpx  # Prefect's own HTTP client (with prefect: see the note at the top)

    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
    except httpx.HTTPError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the Prefect API at {url} does not answer ({reason}); check PREFECT_API_URL"
    if response.status_code != 200:
        return (f"the Prefect API at {url} answered {response.status_code} to /health; "
                "check PREFECT_API_URL")
    return None


def register(app: typer.Typer) -> None:
    """Add ``pvit serve`` to the CLI."""

    @app.command("serve")
    def serve_command(
        config: Path | None = typer.Argument(
            None, help="experiment YAML; its sections become the deployments' default config"),
        flow: list[str] | None = typer.Option(
            None, "--flow", help=f"serve only this flow (repeatable; {', '.join(FLOW_NAMES)})"),
        name: str | None = typer.Option(
            None, help="one deployment name for every flow (runs are <flow>/<name>); by "
            "default each flow's own: " + ", ".join(f"{f}/{d}" for f, (d, _) in
                                                   DEPLOYMENTS.items())),
        limit: int | None = typer.Option(None, min=1, help="flow runs executed at once"),
        sets: list[str] | None = SetOpt,
    ) -> None:
        """Serve the flows as deployments from this process (Ctrl-C stops)."""
        from prefect import serve
        from prefect.settings import PREFECT_API_URL

        experiment = (load_or_exit(config, {}, sets)
                      if config is not None or sets else None)
        if not PREFECT_API_URL.value():
            fail("no Prefect server to serve on: start one (`prefect server start`) and set "
                 "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
        try:
            flows, skipped = load_flows(flow)
        except ValueError as exc:
            fail(str(exc))
        for skipped_name, reason in skipped.items():
            console.print(f"skipping {skipped_name}: {reason}", markup=False)
        if not flows:
            fail("no flow to serve")
        if problem := api_problem(PREFECT_API_URL.value()):
            fail(problem)
        deployments = build_deployments(flows, experiment, name)
        console.print("serving " + ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
                      + f" on {PREFECT_API_URL.value()}", markup=False)
        serve(*deployments, limit=limit)
