from unlearn_search.methods import functional as F
from unlearn_search.methods.base import RETAIN_KINDS, Knob, LossOutput, Method, StepInputs, Term, compose


class SimNPO(Method):
    name = "simnpo"
    summary = "reference-free NPO on the length-normalized likelihood, with a margin"
    reference_paper = "Fan et al. 2024, Simplicity Prevails: SimNPO (arXiv 2410.07163)"
    knobs = (
        Knob("beta", 2.5, "inverse temperature", positive=True),
        Knob("gamma", 0.0, "reward margin"),
        Knob("forget_weight", 1.0, "weight of the SimNPO term", low=0),
        Knob("retain_loss", "ce", "retain term", RETAIN_KINDS),
        Knob("retain_weight", 1.0, "weight of the retain term", low=0),
    )
    needs_retain = True

    def uses_reference(self) -> bool:
        return self.params["retain_loss"] == "kl"

    def _simnpo(self, step: StepInputs):
        mean_logprob = F.sequence_logprob(step.student(step.forget), step.forget["labels"], normalize=True)
        return Term(F.simnpo_loss(mean_logprob, self.params["beta"], self.params["gamma"]), "forget", "rows")

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(
            step,
            "forget_simnpo",
            self._simnpo,
            self.params["forget_weight"],
            self.params["retain_loss"],
            self.params["retain_weight"],
        )
