from unlearn_search.methods.base import Knob, LossOutput, Method, StepInputs, ascent, compose


class GradientAscentKL(Method):
    name = "ga_kl"
    summary = "gradient ascent on forget plus KL(teacher || student) on retain"
    reference_paper = "Yao et al. 2023, Large Language Model Unlearning (arXiv 2310.10683); SemEval-2025 GA+KL"
    knobs = (
        Knob("forget_weight", 0.2, "weight of the ascent term", low=0),
        Knob("retain_weight", 1.0, "weight of the retain KL to the original model", low=0),
    )
    needs_retain = True
    needs_reference = True

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(step, "forget_neg_ce", ascent, self.params["forget_weight"], "kl", self.params["retain_weight"])
