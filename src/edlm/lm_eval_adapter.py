"""The documented entry point of :mod:`edlm.evals.lm_eval`: importing it registers ``--model edlm`` with lm-eval, and
``python -m edlm.lm_eval_adapter [lm-eval arguments]`` runs lm-eval's CLI with edlm's offline tasks."""

from edlm.evals.lm_eval import main  # registers the model on import

if __name__ == "__main__":
    main()
