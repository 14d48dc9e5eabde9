"""`refine plot`: training curves and per-class accuracy from run directories."""
import json

from click.testing import CliRunner

from cli.main import cli

CLASSES = ["circle", "square", "star"]


def write_run(run, epochs=3, eval_every=1, classes=CLASSES, offset=0.0):
    """A run directory as `refine train` leaves it (metrics.jsonl, config.json)."""
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"arch": "resnet18", "classes": classes}))
    with open(run / "metrics.jsonl", "w") as f:
        for epoch in range(1, epochs + 1):
            record = {"epoch": epoch, "train_loss": 1.0 / epoch, "train_top1": 30.0 + 10 * epoch,
                      "train_per_class": [30.0 + 10 * epoch + offset] * len(classes)}
            if epoch % eval_every == 0:
                record.update(val_top1=25.0 + 10 * epoch + offset, val_top5=90.0,
                              val_per_class=[20.0 + 10 * c + offset for c in range(len(classes))])
            f.write(json.dumps(record) + "\n")
    return run


def is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_compares_several_runs_in_one_png(tmp_path):
    gt = write_run(tmp_path / "gt")
    refined = write_run(tmp_path / "refined", eval_every=2, offset=3.0)
    out = tmp_path / "figs" / "compare.png"
    result = CliRunner().invoke(cli, ["plot", str(gt), str(refined), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert is_png(out) and str(out) in result.output
    assert "refined: val top-1 48.00 (epoch 2)" in result.output


def test_plot_defaults_to_the_run_directory(tmp_path):
    run = write_run(tmp_path / "run", classes=[f"c{i}" for i in range(3)])
    result = CliRunner().invoke(cli, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert is_png(run / "plot.png")


def test_runs_that_are_not_plottable_give_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    unevaluated = write_run(tmp_path / "early", epochs=1, eval_every=2)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text("{not json\n")
    other = write_run(tmp_path / "other", classes=["a", "b", "c"])
    for runs, says in [([tmp_path / "empty"], "no metrics.jsonl"),
                       ([unevaluated], "no evaluated epoch yet"),
                       ([broken], "not JSON lines"),
                       ([write_run(tmp_path / "ok"), other], "different classes")]:
        result = CliRunner().invoke(cli, ["plot", *map(str, runs), "--out",
                                          str(tmp_path / "x.png")])
        assert result.exit_code == 2 and says in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "x.png").exists()
