"""Every stage notebook takes its parameters through its one declaration (`mlrg.core.Params`): the papermill parameters
cell lists exactly the declaration's notebook parameters at their defaults, and a misspelled `-p` stops the run with
an error that names it and suggests the right name."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlrg.runs import STAGES, Stage

REPO = Path(__file__).resolve().parents[1]
# every notebook with a parameters cell: the study's stages, and the models notebook (parameters for its examples)
NOTEBOOKS = STAGES + [Stage("models", "02_models.ipynb", "mlrg.models", "MODELS")]
# one misspelling per notebook, and the name it must suggest
TYPOS = {
    "phantom": ("patiens", "patients"),
    "prepare": ("min_frq", "min_freq"),
    "label": ("text_colum", "text_column"),
    "pretrain": ("bach_size", "batch_size"),
    "finetune": ("ft_lrr", "ft_lr"),
    "evaluate": ("uncertain_polcy", "uncertain_policy"),
    "models": ("image_sise", "image_size"),
}


def _parameters_cell(notebook):
    nb = json.loads((REPO / "nbs" / notebook).read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{notebook}: expected one cell tagged 'parameters', found {len(cells)}"
    return "".join(cells[0]["source"])


@pytest.mark.parametrize("stage", NOTEBOOKS, ids=lambda s: s.name)
def test_parameters_cell_is_the_declaration(stage):
    "The cell assigns exactly the declaration's notebook parameters, at their defaults (papermill reads names from it)."
    ns = {}
    exec(_parameters_cell(stage.notebook), ns)
    assert {k: v for k, v in ns.items() if not k.startswith("_")} == stage.declaration().defaults("notebook")
    assert _parameters_cell(stage.notebook).strip() == stage.declaration().parameters_cell().strip()


def test_every_typo_names_a_declared_parameter():
    for s in NOTEBOOKS:
        typo, right = TYPOS[s.name]
        assert right in s.declaration().defaults("notebook") and typo not in s.declaration().params


@pytest.mark.parametrize("stage", NOTEBOOKS, ids=lambda s: s.name)
def test_papermill_refuses_a_misspelled_parameter(stage, tmp_path):
    "`papermill NB out.ipynb -p <typo> 1` exits non-zero, naming the typo and the parameter meant."
    typo, right = TYPOS[stage.name]
    papermill = Path(sys.executable).parent / "papermill"
    cmd = [
        str(papermill) if papermill.exists() else "papermill",
        "--cwd",
        str(REPO / "nbs"),
        "--log-level",
        "WARNING",
        str(REPO / "nbs" / stage.notebook),
        str(tmp_path / "out.ipynb"),
        "-p",
        typo,
        "1",
    ]
    p = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "MLRG_OUTPUTS": str(tmp_path / "outputs")},
    )
    assert p.returncode != 0, f"{stage.notebook} ran to the end with -p {typo} 1"
    assert f"'{typo}'" in p.stderr + p.stdout and f"did you mean '{right}'" in p.stderr + p.stdout, p.stderr[-3000:]
