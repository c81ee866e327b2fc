"""The layout holds: imports point one way, modules stay small, dvc.yaml is what the stages declare."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lowrank"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Every import inside the package, function-level ones included; and private names taken across modules."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [known(alias.name) for alias in node.names if alias.name.startswith("lowrank")]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, path, node)
                if not source.startswith("lowrank"):
                    continue
                targets = [known(f"{source}.{alias.name}") for alias in node.names]
                private += [f"{module} takes {alias.name} from {source}" for alias in node.names
                            if alias.name.startswith("_") and not alias.name.startswith("__")]
            else:
                continue
            graph[module].update(t for t in targets if t and t != module)
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_and_no_private_name_across_modules() -> None:
    graph, private = import_graph()
    assert cycles(graph) == []
    assert private == []


def test_the_library_never_imports_orchestration() -> None:
    banned = re.compile(r"^\s*(from|import)\s+(prefect|mlflow|dvc|tasks|flows)\b", re.M)
    offenders = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if banned.search(p.read_text())]
    assert offenders == []


def test_no_module_past_400_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_committed_dvc_yaml_is_what_the_stages_declare() -> None:
    from lowrank.pipeline.dvc import dvc_yaml

    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(), "run `lowrank dvc-yaml > dvc.yaml`"


def test_every_declared_stage_is_in_dvc_yaml_with_its_files() -> None:
    import yaml

    from lowrank.pipeline import STAGES

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    assert stages["factorize"]["plots"] == [{"${paths.metrics}/factorize_phi.png": {"cache": False}}]
    assert {"${paths.metrics}/prune_ranks.json": {"cache": False}} in stages["prune"]["outs"]
    assert "${paths.artifacts}/prune/masks.safetensors" in stages["mrft"]["deps"] or \
        "${paths.artifacts}/factorize_pruned/masks.safetensors" in stages["mrft"]["deps"]


def _layout_block(path: Path) -> str:
    text = path.read_text()
    start = text.index("```\n", text.index("Layout") if path.name == "README.md" else 0) + 4
    return text[start:text.index("```", start)]


def test_the_readme_layout_names_every_top_level_folder() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    folders = {f.split("/")[0] + "/" for f in tracked if "/" in f and not f.startswith(".")}
    listed = set(re.findall(r"^(\w+/)", _layout_block(REPO / "README.md"), re.M))
    assert listed == folders


def test_the_docs_layout_names_every_module_of_every_folder() -> None:
    """Under each folder line, the line of its module names: exactly the folder's modules, none missing, none gone."""
    lines = _layout_block(REPO / "docs" / "extending" / "index.md").splitlines()
    listed = {}
    for line, following in zip(lines, lines[1:]):
        folder = re.match(r"^((?:lowrank/)?\w+/)\s", line)
        if folder and following.startswith("  ") and following.strip():
            listed[folder.group(1)] = sorted(following.split())
    python_folders = ["lowrank/"] + [p.relative_to(REPO).as_posix() + "/" for p in sorted(PACKAGE.iterdir())
                                     if (p / "__init__.py").is_file()] + ["tasks/", "flows/"]
    actual = {folder: sorted(f.stem for f in (REPO / folder).glob("*.py") if f.stem != "__init__") for folder in python_folders}
    assert listed == actual


def test_dvc_repro_of_a_path_s_last_stage_runs_every_stage_of_the_path() -> None:
    """What `dvc repro summary_<path>` runs, read from dvc.yaml as DVC reads it: outs feed deps."""
    import yaml

    from lowrank.pipeline import path_ends, path_stages

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    writer = {}
    for name, stage in stages.items():
        for out in [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            writer[out if isinstance(out, str) else next(iter(out))] = name

    def needs(name: str) -> set[str]:
        found = {name}
        for dep in stages[name]["deps"]:
            if dep in writer:
                found |= needs(writer[dep])
        return found

    for path, end in path_ends().items():
        assert needs(end) == set(path_stages(path)), path
    assert {"evaluate_dense", "evaluate_factorized", "evaluate_compressed"} <= needs("summary_factorize")


def test_every_orchestration_path_has_one_declared_end_and_the_training_stages_say_so() -> None:
    """The paths params.yaml accepts (config, below the pipeline, lists them) are those the stages end; `trains` marks
    the stages that train, which a sweep's --gpu sends to a GPU worker."""
    import typing

    from lowrank.config.sections import OrchestrationConfig
    from lowrank.pipeline import STAGES, path_ends

    accepted = typing.get_args(typing.get_type_hints(OrchestrationConfig)["path"])
    assert sorted(path_ends()) == sorted(accepted)
    assert path_ends()["factorize"] == "summary_factorize" and path_ends()["dense"] == "evaluate_dense"
    assert [name for name, st in STAGES.items() if st.trains] == ["finetune", "finetune_compressed", "prune", "mrft"]
