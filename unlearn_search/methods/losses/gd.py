from unlearn_search.methods.base import Knob, LossOutput, Method, StepInputs, ascent, compose


class GradientDifference(Method):
    name = "gd"
    summary = "gradient ascent on forget plus cross-entropy on retain"
    reference_paper = "Liu et al. 2022, Continual Learning and Private Unlearning; Maini et al. 2024, TOFU"
    knobs = (
        Knob("forget_weight", 1.0, "weight of the ascent term", low=0),
        Knob("retain_weight", 1.0, "weight of the retain cross-entropy", low=0),
    )
    needs_retain = True

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(step, "forget_neg_ce", ascent, self.params["forget_weight"], "ce", self.params["retain_weight"])
