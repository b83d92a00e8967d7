from unlearn_search.methods import functional as F
from unlearn_search.methods.base import RETAIN_KINDS, Knob, LossOutput, Method, StepInputs, Term, compose


class WGA(Method):
    name = "wga"
    summary = "gradient ascent with each forget token weighted by its own probability to the power beta"
    reference_paper = "Wang et al. 2025, Rethinking LLM Unlearning Objectives (arXiv 2502.19301), WGA"
    # The authors' defaults (open-unlearning WGA: beta 1, gamma 1, alpha 1, an NLL retain term).
    knobs = (
        Knob("beta", 1.0, "power of the token probability that weights its ascent (0: plain GA)", low=0),
        Knob("forget_weight", 1.0, "weight of the weighted ascent (the authors' gamma)", low=0),
        Knob("retain_loss", "ce", "retain term", RETAIN_KINDS),
        Knob("retain_weight", 1.0, "weight of the retain term (the authors' alpha)", low=0),
    )
    needs_retain = True

    def uses_reference(self) -> bool:
        return self.params["retain_loss"] == "kl"

    def _wga(self, step: StepInputs) -> Term:
        logits = step.student(step.forget)
        return Term(F.wga_loss(logits, step.forget["labels"], self.params["beta"]), "forget", "tokens")

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(
            step,
            "forget_wga",
            self._wga,
            self.params["forget_weight"],
            self.params["retain_loss"],
            self.params["retain_weight"],
        )
