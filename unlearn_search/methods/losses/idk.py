from unlearn_search.methods import functional as F
from unlearn_search.methods.base import RETAIN_KINDS, Knob, LossOutput, Method, StepInputs, Term, compose


class IDK(Method):
    name = "idk"
    summary = "cross-entropy towards a template refusal on forget prompts, with a retain term"
    reference_paper = "Maini et al. 2024, TOFU (arXiv 2401.06121), 'I don't know' tuning"
    knobs = (
        Knob("forget_weight", 1.0, "weight of the refusal cross-entropy", low=0),
        Knob("retain_loss", "ce", "retain term", RETAIN_KINDS),
        Knob("retain_weight", 1.0, "weight of the retain term", low=0),
    )
    needs_retain = True
    alternative = "refusal"

    def uses_reference(self) -> bool:
        return self.params["retain_loss"] == "kl"

    def student_batches(self) -> tuple[str, ...]:
        return tuple(b for b in super().student_batches() if b != "forget")  # refusals stand in for the forget answers

    @staticmethod
    def _refusal(step: StepInputs):
        return Term(
            F.cross_entropy(step.student(step.alternative), step.alternative["labels"]), "alternative", "tokens"
        )

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(
            step,
            "forget_refusal_ce",
            self._refusal,
            self.params["forget_weight"],
            self.params["retain_loss"],
            self.params["retain_weight"],
        )
