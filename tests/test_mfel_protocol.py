"""The paper's protocol on its four data sets, each built as it is downloaded (tiny files): the
row printed at start-up, the split used, and the checkpoint tested (the last epoch)."""
import pytest

import mfel
from test_layouts import layouts

TINY = ["--preset", "tiny", "--img-size", "16", "--batch-size", "2", "--epochs", "1"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return layouts(tmp_path_factory.mktemp("layouts"))


@pytest.mark.parametrize("layout,row,split", [  # the fixtures' sizes: 3/2, 4/2, 4/1/2
    ("glas", "glas      official split, train 85 / test 80", "train 3, val 0, test test 2"),
    ("isic2016", "isic2016  official split, train 900 / test 379", "train 4, val 0, test"),
    ("isic2017", "isic2017  official split, train 2000 / test 600", "train 4, val 1, test"),
])
def test_each_data_set_runs_its_protocol(roots, layout, row, split, tmp_path, capsys):
    metrics = mfel.main(TINY + ["--data", str(roots[layout]), "--out", str(tmp_path / "run")])
    log = capsys.readouterr().out
    assert row in log and "\n  all       from scratch" in log
    assert "testing last.pt (epoch 0)" in log  # the paper has no validation: the last epoch
    official_val = "validation (1 images) is logged; the last epoch is tested" in log
    assert official_val == (layout == "isic2017")  # ISIC 2017's val folder: for the log only
    assert split in log  # GlaS: testA and testB pooled into the 80 of Table 1
    for scores in metrics.values():
        assert set(scores) == {"per-image", "global"}


def test_ph2_tests_the_isic2016_model(roots, tmp_path, capsys):
    mfel.main(TINY + ["--data", str(roots["isic2016"]), "--out", str(tmp_path / "isic")])
    capsys.readouterr()
    metrics = mfel.main(["--eval", str(tmp_path / "isic" / "last.pt"), "--data",
                         str(roots["ph2"]), "--out", str(tmp_path / "ph2")])
    log = capsys.readouterr().out
    assert "ph2       all 200 images, 256 x 256, test the ISIC 2016 model" in log
    assert sum(1 for line in log.splitlines() if line.startswith("data:")) == 1
    assert "test " in log and ", val 0, test" in log and len(metrics) == 1
