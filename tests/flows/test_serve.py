"""``flows.serve`` without a server: which flows load, the deployments built from an
experiment file, and the ``pvit serve`` command's bad-input exits (the slow test in
``test_deployment.py`` serves for real)."""

import pytest
import typer
import yaml
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from flows.experiment import load_experiment
from flows.serve import FLOW_NAMES, build_deployments, load_flows, register


def test_load_flows_skips_only_missing_modules():
    flows, skipped = load_flows()
    assert "generate_dataset" in flows
    assert set(flows) | set(skipped) == set(FLOW_NAMES)
    assert not set(flows) & set(skipped)


def test_load_flows_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown flow"):
        load_flows(["generate_dataset", "nope"])


def test_deployments_default_to_the_experiment_sections(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"generation": {"out": str(tmp_path / "shards"), "scenes": 2,
                                                   "scene": {"resolution": 32}}}))
    flows, _ = load_flows(["generate_dataset"])
    [deployment] = build_deployments(flows, load_experiment(path), name="local")
    assert deployment.name == "local"
    assert deployment.entrypoint.endswith("generate.py:generate_dataset")
    config = deployment.parameters["config"]
    assert config["scenes"] == 2 and config["scene"]["resolution"] == 32

    [bare] = build_deployments(flows)
    assert bare.parameters == {}


def test_each_flow_has_its_own_deployment_name_description_and_run_form_help():
    flows, _ = load_flows()
    deployments = {d.flow_name: d for d in build_deployments(flows)}
    assert {f: d.name for f, d in deployments.items()} == {
        "generate_dataset": "synthetic-dataset", "pretrain": "prompt-pretraining",
        "finetune": "fine-tuning", "evaluate": "evaluation", "humanoid_actions": "action-set",
        "pipeline": "full-pipeline"}
    for flow_name, deployment in deployments.items():
        assert deployment.description and "``" not in deployment.description, flow_name
        form = flows[flow_name].parameters.model_dump()["properties"]   # the run form
        assert form["config"]["description"].startswith("the "), flow_name


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("noop")(lambda: None)  # two commands, so `serve` stays a subcommand
    register(app)
    return app


def test_serve_command_bad_input_exits_2(tmp_path):
    runner = CliRunner()
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        result = runner.invoke(_app(), ["serve", "--flow", "nope"])
        assert result.exit_code == 2
        assert "unknown flow" in result.output

        result = runner.invoke(_app(), ["serve", str(tmp_path / "missing.yaml")])
        assert result.exit_code == 2
        assert "config file not found" in result.output

        # issue 24: a closed port was a ConnectError traceback from inside prefect.serve
        result = runner.invoke(_app(), ["serve", "--flow", "generate_dataset"])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "http://127.0.0.1:9/api does not answer" in lines[0], lines

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = runner.invoke(_app(), ["serve"])
        assert result.exit_code == 2
        assert "PREFECT_API_URL" in result.output
