"""The pipeline: stages declared once (`stage`), one module per path, and what a run takes (`plan`).

Importing this package registers every stage, in run order: the shared ones
(`common`), the factorize path (`factorize`), the prune-and-factorize path
(`lpaf`), and each path's last stage (`summary`). The library never imports Prefect, MLflow or DVC: `tasks/` and
`flows/` drive these functions, and `dvc.yaml` is printed from them (`dvc`).
"""

from lowrank.pipeline import common, factorize, lpaf_stages, summary  # noqa: F401  register the stages, in run order
from lowrank.pipeline.common import EVALUATIONS
from lowrank.pipeline.plan import path_ends, path_stages, pipeline, preflight, preflight_stage
from lowrank.pipeline.prepared import PreparedData
from lowrank.pipeline.stage import STAGES, Layout, Stage, StageIO, StageResult, get_stage, stage

__all__ = [
    "EVALUATIONS", "STAGES", "Layout", "PreparedData", "Stage", "StageIO", "StageResult", "get_stage", "path_ends", "path_stages",
    "pipeline", "preflight", "preflight_stage", "stage",
]
