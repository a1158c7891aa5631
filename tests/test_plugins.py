"""The README's plug-in example, written out and run from a directory outside the package."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def example_files():
    text = README.read_text()
    block = text[text.index("<!-- plugin-example:begin -->") : text.index("<!-- plugin-example:end -->")]
    files, command = {}, None
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", block, flags=re.S):
        first, _, rest = body.partition("\n")
        if lang == "bash":
            command = body.strip()
        else:
            files[first.lstrip("# ").split(" ")[0]] = rest
    return files, command


def test_readme_plugin_example_runs_from_outside_the_package(tmp_path):
    files, command = example_files()
    assert set(files) >= {"mypkg/codecs.py", "mypkg/strategies.py", "mypkg/models.py", "myconf/strategy/fedavgm.yaml"}
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    args = shlex.split(command)
    assert args[0] == "fedcomp"
    proc = subprocess.run([sys.executable, "-m", "fedcomp", *args[1:], "progress=false", "hydra.run.dir=out"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["config"]["strategy"]["_target_"] == "mypkg.strategies.FedAvgM"
    assert summary["final_accuracy"] > summary["initial_accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    dense = summary["dense_payload_bytes"]  # fp32 model; the synthetic input is 1x12x12
    assert all(r["bytes_up"] < 4 * 0.2 * dense for r in rows)  # 5% of the values, at 2 bytes each, plus indices


def test_flower_strategies_are_refused_with_a_message():
    from fedcomp.config import ConfigError, compose_config

    try:
        compose_config(["strategy._target_=flwr.serverapp.strategy.FedAvg"])
    except ConfigError as exc:
        assert str(exc).startswith("strategy._target_:") and "CompressedFedAvg" in str(exc)
    else:
        raise AssertionError("a Flower strategy was accepted")
