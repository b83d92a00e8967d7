from unlearn_search.methods import functional as F
from unlearn_search.methods.base import Knob, LossOutput, Method, StepInputs, Term, compose

DIVERGENCES = ("kl", "js", "tv", "pearson")


class FLAT(Method):
    """Forget data only: template answers are preferred, forget answers pushed away."""

    name = "flat"
    summary = "maximize the variational f-divergence between template and forget answers"
    reference_paper = "Wang et al. 2024, LLM Unlearning via Loss Adjustment with only Forget Data (arXiv 2410.11143)"
    knobs = (Knob("divergence", "kl", "f-divergence", DIVERGENCES),)
    alternative = "refusal"

    def _flat(self, step: StepInputs):
        template = F.mean_token_prob(step.student(step.alternative), step.alternative["labels"])
        forget = F.mean_token_prob(step.student(step.forget), step.forget["labels"])
        return Term(F.flat_loss(template, forget, self.params["divergence"]), "forget", "rows")

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(step, "forget_flat", self._flat, 1.0, "none", 0.0)
