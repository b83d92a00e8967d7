from unlearn_search.methods import functional as F
from unlearn_search.methods.base import RETAIN_KINDS, Knob, LossOutput, Method, StepInputs, Term, compose


class NPO(Method):
    name = "npo"
    summary = "negative preference optimization against the original model's likelihood"
    reference_paper = "Zhang et al. 2024, Negative Preference Optimization (arXiv 2404.05868)"
    knobs = (
        Knob("beta", 0.1, "inverse temperature", positive=True),
        Knob("forget_weight", 1.0, "weight of the NPO term", low=0),
        Knob("retain_loss", "ce", "retain term", RETAIN_KINDS),
        Knob("retain_weight", 1.0, "weight of the retain term", low=0),
    )
    needs_retain = True
    needs_reference = True

    def reference_batches(self) -> tuple[str, ...]:
        return ("forget",) + ("retain",) * (self.params["retain_loss"] == "kl")  # the likelihood ratio's denominator

    def _npo(self, step: StepInputs):
        labels = step.forget["labels"]
        student = F.sequence_logprob(step.student(step.forget), labels)
        loss = F.npo_loss(student, step.reference("forget").sequence_logprob(labels), self.params["beta"])
        return Term(loss, "forget", "rows")

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(
            step,
            "forget_npo",
            self._npo,
            self.params["forget_weight"],
            self.params["retain_loss"],
            self.params["retain_weight"],
        )
