from unlearn_search.methods.base import RETAIN_KINDS, Knob, LossOutput, Method, StepInputs, Term, compose


class UNDIAL(Method):
    name = "undial"
    summary = "self-distillation towards the original's distribution with the forget token's logit lowered by beta"
    reference_paper = "Dong et al. 2024, Unlearning via Self-Distillation with Adjusted Logits (arXiv 2402.10052)"
    # The authors' defaults (open-unlearning UNDIAL: beta 10, gamma 1, alpha 0: no retain term).
    knobs = (
        Knob("beta", 10.0, "how far the forget token's logit is lowered in the distillation target", low=0),
        Knob("forget_weight", 1.0, "weight of the distillation term (the authors' gamma)", low=0),
        Knob("retain_loss", "none", "retain term (the authors': none, alpha 0)", RETAIN_KINDS),
        Knob("retain_weight", 1.0, "weight of the retain term (the authors' alpha)", low=0),
    )
    needs_retain = True
    needs_reference = True

    def reference_batches(self) -> tuple[str, ...]:
        return ("forget",) + ("retain",) * (self.params["retain_loss"] == "kl")  # the distillation target

    def _undial(self, step: StepInputs) -> Term:
        labels = step.forget["labels"]
        loss = step.reference("forget").undial(step.student(step.forget), labels, self.params["beta"])
        return Term(loss, "forget", "tokens")

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(
            step,
            "forget_undial",
            self._undial,
            self.params["forget_weight"],
            self.params["retain_loss"],
            self.params["retain_weight"],
        )
