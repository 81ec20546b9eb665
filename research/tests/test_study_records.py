"""The offset study's committed records reproduce the figures that ``research/offset_study.md`` and
``research/README.md`` quote (``make research-test``; not part of ``make test``)."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _controls():
    spec = importlib.util.spec_from_file_location("controls", ROOT / "research" / "controls.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = ROOT / "research" / "results" / "offset_variants.jsonl"
    return module, [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_control_table_gives_the_quoted_differences():
    module, variants = _controls()
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in module.control_table(variants)}
    assert "**+0.0033 (0.0009)**" in rows[("finetune", "resnet / sgd")]
    assert "**+0.0044 (0.0020)**" in rows[("finetune", "vit / adamw")]
    assert "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11" in rows[("finetune", "vit / adamw")]
    scratch = rows[("scratch", "resnet / sgd")]
    assert "+0.0039 (0.0020) | +0.0043 (0.0022) | +0.0034 (0.0016)" in scratch


def test_noise_table_separates_noise_from_drift():
    module, variants = _controls()
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in module.noise_table(variants)}
    resnet = rows[("scratch", "resnet / sgd")].split("|")
    vit = rows[("scratch", "vit / sgd")].split("|")
    assert float(resnet[4].split()[0]) > 0.6 and float(vit[4].split()[0]) < 0.2  # noise share of ||Delta||^2
    assert float(vit[6]) > 0.8 and float(vit[5]) < 0.1  # an unchanged offset would have persisted; it did not


def test_cap_table_gives_the_figures_behind_the_default_cap():
    """The 0.1 cap replaced 0.25 on these numbers (``research/offset_study.md`` item 8)."""
    module, _ = _controls()
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in module.cap_table()}
    vit_adamw = rows[("scratch", "vit / adamw", "ff -> ff_mod")]
    assert "| 24 | -0.0055 (0.0029) | **-0.0010 (0.0017)** | -0.0270 | +0.0045 (0.0021) |" in vit_adamw
    assert "**+0.0037 (0.0011)**" in rows[("finetune", "vit / adamw", "ff -> ff_mod")]


def test_fresh_seeds_give_the_quoted_verdict():
    """On seeds that played no part in choosing the cap, the default is below FF on the ViT from scratch with AdamW
    (``research/offset_study.md`` item 9): the pre-registered test fails there."""
    module, _ = _controls()
    rows = {line.split("|")[1].strip(): line for line in module.fresh_table()}
    assert "| 24-55 (32) | -0.0045 (0.0015) | -0.0075 to -0.0016 | -0.0335 | 22 of 32 | fails |" in rows["vit / adamw"]


def test_fresh_controls_attribute_the_loss_to_the_direction():
    """``research/offset_study.md`` item 9: on fresh ViT/AdamW seeds the default is below a random push of its size."""
    module, variants = _controls()
    (row,) = module.fresh_control_table(variants)[2:]
    assert "| 24-50 (27) | -0.0038 (0.0016) | +0.0084 (0.0027) | +0.0020 (0.0009) | **-0.0123 (0.0032)** |" in row


def test_fresh_resnet_seeds_confirm_the_architecture_default():
    """``research/offset_study.md`` item 14: on fresh seeds the ResNet default passes in all six ResNet cells."""
    module, _ = _controls()
    rows = module.default_by_architecture_table()[2:]
    assert len(rows) == 6 and all("| passes |" in row for row in rows)
    assert "| finetune 5-9 -> 0-4 | resnet / sgd | 6-11 (6) | +0.0045 (0.0013) | -0.0010 | 5 / 0 / 1 |" in rows[4]


def test_lora_does_not_change_the_vit_verdict():
    """``research/offset_study.md`` item 15: with LoRA, the paper's ViT setting, the offset's gain is not 2 standard
    errors above zero on either class split, and it never loses by the never-worse test."""
    module, _ = _controls()
    rows = module.lora_table()[2:]
    assert len(rows) == 2 and all("| no | passes |" in row for row in rows)
    assert "| 0-11 (12) | +0.0027 (0.0014) | -0.0040 | 2 of 12 |" in rows[0]
    assert "| 0-11 (12) | +0.0002 (0.0014) | -0.0110 | 3 of 12 |" in rows[1]


def test_readme_figures():
    """The figures ``research/README.md`` quotes that the tests above do not cover."""
    module, variants = _controls()
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in module.control_table(variants)}
    assert "**-0.0004 (0.0015)**" in rows[("scratch", "resnet / sgd")]
    reverse = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in module.reverse_table()}
    assert "| +0.0037 (0.0011) |" in reverse[("0-4 -> 5-9", "vit / adamw")]
    assert "| -0.0010 (0.0010) |" in reverse[("5-9 -> 0-4", "vit / adamw")]
    (sgd, _) = module.reverse_control_table(variants)[2:]
    assert "**+0.0043 (0.0017)**" in sgd
    architecture = module.default_by_architecture_table()[2:]
    assert "| +0.0028 (0.0011) |" in architecture[2] and "| 6.5% of 0.044 |" in architecture[2]
    assert "| 3.7% of 0.123 |" in architecture[4]


@pytest.mark.parametrize("folder", sorted(p.name for p in (ROOT / "research" / "results").glob("cpu_study*")))
def test_report_reproduces_the_committed_table(folder):
    """``research/cpu_study.py --out research/results/FOLDER --report`` writes the committed ``table.md`` byte for byte."""
    spec = importlib.util.spec_from_file_location("cpu_study", ROOT / "research" / "cpu_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cpu_study", module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    path = ROOT / "research" / "results" / folder
    results = [json.loads(line) for line in (path / "runs.jsonl").read_text().splitlines() if line.strip()]
    assert module.report(results, str(path), plots=False) + "\n" == (path / "table.md").read_text()


def test_papers_rule_collapses_the_vit():
    """``research/README.md``: the paper's rule is below FF in 7 of 8 cells; ViT/AdamW from scratch 0.772 -> 0.373."""
    rows = []
    for folder in ("cpu_study", "cpu_study_finetune"):
        table = (ROOT / "research" / "results" / folder / "table.md").read_text()
        rows += [line for line in table.splitlines() if "| ff -> ff_paper |" in line]
    assert len(rows) == 8 and sum(" | -0." in row for row in rows) == 7
    assert any(row.startswith("| vit | adamw |") and "| 0.772 | 0.373 |" in row for row in rows[:4])
