from unlearn_search.methods import functional as F
from unlearn_search.methods.base import Knob, LossOutput, Method, StepInputs, Term, Terms, ascent, compose


class RandomLabel(Method):
    """GA + random outputs + KL on retain, the three terms of Yao et al. 2023."""

    name = "random_label"
    summary = "cross-entropy towards random answers on forget prompts, with GA and a retain KL"
    reference_paper = "Yao et al. 2023, Large Language Model Unlearning (arXiv 2310.10683)"
    knobs = (
        Knob("random_weight", 1.0, "weight of the random-answer cross-entropy", low=0),
        Knob("forget_weight", 0.5, "weight of the ascent term (0 turns it off)", low=0),
        Knob("retain_weight", 1.0, "weight of the retain KL", low=0),
        Knob("random_source", "retain", "random answers: other retain answers or random tokens", ("retain", "tokens")),
    )
    needs_retain = True
    needs_reference = True
    alternative = "random"

    def student_batches(self) -> tuple[str, ...]:
        batches = super().student_batches()
        return batches if self.params["forget_weight"] else tuple(b for b in batches if b != "forget")

    def _forget(self, step: StepInputs) -> Terms:
        random_ce = F.cross_entropy(step.student(step.alternative), step.alternative["labels"])
        terms = ((self.params["random_weight"], Term(random_ce, "alternative", "tokens")),)
        if self.params["forget_weight"]:
            terms += ((self.params["forget_weight"], ascent(step)),)
        return terms

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(step, "forget_random", self._forget, 1.0, "kl", self.params["retain_weight"])
