"""The house rule: stage modules (`pretrain`, `finetune`, `study`) import library modules and never each other; library
modules import no stage module. Checked on every import statement of `mlrg/*.py` (top level and inside functions).
A stage's module is reached by name only through the registry in `mlrg.runs` (the `mlrg` command,
`Stage.declaration`)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlrg"
STAGES = {"pretrain", "finetune", "study"}
LIBRARY = {"core", "engine", "runs", "metrics", "data", "phantom", "learnability", "inputs", "models", "decoder",
           "report_model", "evaluate", "labeler"}  # fmt: skip


def mlrg_imports(path: Path) -> set:
    "The mlrg modules `path` imports (`from .x`, `from mlrg.x`, `from mlrg import x`, `import mlrg.x`)."
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mlrg.")}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 and mod:
                out.add(mod.split(".")[0])
            elif node.level == 1 or mod == "mlrg":
                out |= {a.name for a in node.names}
            elif mod.startswith("mlrg."):
                out.add(mod.split(".")[1])
    return out


def layout_violations(package=PACKAGE) -> list:
    "'a imports b' for each import that breaks the rule."
    bad = []
    for path in sorted(package.glob("*.py")):
        name = path.stem
        if name.startswith("_"):
            continue
        for other in sorted(mlrg_imports(path) - {name}):
            if other in STAGES and (name in STAGES or name in LIBRARY):
                bad.append(f"{name} imports {other}")
    return bad


def test_every_module_is_a_stage_or_library():
    names = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")}
    assert names == STAGES | LIBRARY, (
        f"classify these modules in tests/test_layout.py: {sorted(names ^ (STAGES | LIBRARY))}"
    )


def test_stages_import_only_the_library():
    assert layout_violations() == []


CASES = [
    ("evaluate", "from .finetune import FINETUNE", "evaluate imports finetune"),
    ("finetune", "from mlrg import pretrain", "finetune imports pretrain"),
    ("inputs", "import mlrg.study", "inputs imports study"),
    ("finetune", "def _f():\n    from mlrg.pretrain import pretrain", "finetune imports pretrain"),
]


@pytest.mark.parametrize("module, code, expected", CASES)
def test_the_check_sees_a_stage_import(tmp_path, module, code, expected):
    "A copy of the package with one forbidden import added fails the check, naming it."
    for p in PACKAGE.glob("*.py"):
        (tmp_path / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    target = tmp_path / f"{module}.py"
    target.write_text(target.read_text(encoding="utf-8") + "\n" + code + "\n", encoding="utf-8")
    assert layout_violations(tmp_path) == [expected]
