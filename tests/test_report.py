"""`ftclip report` on a fixture metrics file with known per-step norms."""

from __future__ import annotations

import builtins
import json

import pytest
from typer.testing import CliRunner

from ftclip.cli import app
from ftclip.report import analyze, read_history, sparkline

# 40 steps logged 10 per line: norms 1..40 scaled by 0.1 (0.1 ... 4.0), a spike at step 35, threshold 2.0.
NORMS = [0.1 * i for i in range(1, 41)]
NORMS[34] = 80.0


def write_metrics(folder, norms=NORMS, threshold=2.0):
    lines = []
    for start in range(0, len(norms), 10):
        chunk = list(range(start + 1, start + 11))
        values = norms[start:start + 10]
        lines.append({
            "step": chunk[-1], "loss": 1.0, "grad_norm": values[-1], "clip_coef": 1.0, "eval_loss": 1.5,
            "per_step": {"step": chunk, "loss": [2.0 if s == 36 else 1.0 for s in chunk], "grad_norm": values,
                         "clip_coef": [min(1.0, threshold / n) for n in values], "threshold": [threshold] * 10},
        })
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_report_percentiles_spikes_and_suggestion(tmp_path):
    report = analyze(read_history(write_metrics(tmp_path / "run")))
    finite = sorted(NORMS)
    # numpy.percentile(NORMS, 50) = mean of the 20th and 21st sorted values; p90 at rank 35.1
    assert report.percentiles["p50"] == pytest.approx((finite[19] + finite[20]) / 2)
    assert report.percentiles["p90"] == pytest.approx(finite[35] + 0.1 * (finite[36] - finite[35]))
    assert report.percentiles["max"] == 80.0
    assert report.clipped_steps == sum(n > 2.0 for n in NORMS) == 20
    assert [(s.step, s.loss_jump) for s in report.spikes] == [(35, True)]
    # Suggested: p90 of steps 5..40 (the first tenth dropped), rounded to 2 significant digits.
    settled = sorted(NORMS[4:])
    rank = (len(settled) - 1) * 0.9
    expected = settled[int(rank)] + (rank - int(rank)) * (settled[int(rank) + 1] - settled[int(rank)])
    assert report.suggested == float(f"{expected:.2g}")
    assert any("clipped 50% of steps, between steps 21 and 40" in line for line in report.reasoning)


def test_report_command_writes_png(tmp_path):
    run = write_metrics(tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "suggested max_norm" in result.output and "spikes" in result.output
    png = (run / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_without_matplotlib_falls_back_to_a_sparkline(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    run = write_metrics(tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "matplotlib is not installed" in result.output
    assert sparkline(NORMS) in result.output
    assert not (run / "report.png").exists()


def test_sparkline_is_log_scaled_and_marks_nonfinite():
    assert sparkline([1.0, 10.0, 100.0, float("inf")]) == "▁▅█!"


def test_report_on_a_folder_without_metrics_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output
