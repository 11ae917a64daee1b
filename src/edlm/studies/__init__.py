"""Studies: grids of conversion runs from one AR source model, their measurements and a report.

``edlm study --config configs/study.yaml`` runs :func:`run_study` then :func:`write_report`.
"""

from edlm.studies.grid import Comparison, Run, StudyConfig, collect, expand, load_study_config, run_study
from edlm.studies.report import verdict, write_report

__all__ = ["Comparison", "Run", "StudyConfig", "collect", "expand", "load_study_config", "run_study", "verdict",
           "write_report"]
