from unlearn_search.methods import functional as F
from unlearn_search.methods.base import RETAIN_KINDS, Knob, LossOutput, Method, StepInputs, Term, compose


class SatImp(Method):
    name = "satimp"
    summary = "gradient ascent with each forget token weighted by p^beta1 (1 - p)^beta2"
    reference_paper = (
        "Yang et al. 2025, Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning (arXiv 2505.11953)"
    )
    # The authors' defaults (open-unlearning SatImp: beta1 5, beta2 1, gamma 0.1, alpha 1, an NLL retain term).
    knobs = (
        Knob("beta1", 5.0, "power of the token probability in the saturation weight", low=0),
        Knob("beta2", 1.0, "power of one minus the token probability in the importance weight", low=0),
        Knob("forget_weight", 0.1, "weight of the weighted ascent (the authors' gamma)", low=0),
        Knob("retain_loss", "ce", "retain term", RETAIN_KINDS),
        Knob("retain_weight", 1.0, "weight of the retain term (the authors' alpha)", low=0),
    )
    needs_retain = True

    def uses_reference(self) -> bool:
        return self.params["retain_loss"] == "kl"

    def _satimp(self, step: StepInputs) -> Term:
        logits, labels = step.student(step.forget), step.forget["labels"]
        return Term(F.satimp_loss(logits, labels, self.params["beta1"], self.params["beta2"]), "forget", "tokens")

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(
            step,
            "forget_satimp",
            self._satimp,
            self.params["forget_weight"],
            self.params["retain_loss"],
            self.params["retain_weight"],
        )
