from unlearn_search.methods import functional as F
from unlearn_search.methods.base import RETAIN_KINDS, Knob, LossOutput, Method, StepInputs, Term, compose


class IdkDPO(Method):
    name = "idk_dpo"
    summary = "DPO against the original model: a refusal preferred, the forget answer rejected"
    reference_paper = "Rafailov et al. 2023, DPO (arXiv 2305.18290); with refusals as in TOFU (Maini et al. 2024)"
    # The authors' defaults (open-unlearning DPO and its GradDiff base: beta 1, gamma 1, alpha 1,
    # an NLL retain term).
    knobs = (
        Knob("beta", 1.0, "inverse temperature of the preference", positive=True),
        Knob("forget_weight", 1.0, "weight of the DPO term (the authors' gamma)", low=0),
        Knob("retain_loss", "ce", "retain term", RETAIN_KINDS),
        Knob("retain_weight", 1.0, "weight of the retain term (the authors' alpha)", low=0),
    )
    needs_retain = True
    needs_reference = True
    alternative = "refusal"

    def reference_batches(self) -> tuple[str, ...]:
        # Both answers' likelihood ratios; the retain set's too for a KL retain term.
        return ("alternative", "forget") + ("retain",) * (self.params["retain_loss"] == "kl")

    def _dpo(self, step: StepInputs) -> Term:
        chosen, rejected = step.alternative["labels"], step.forget["labels"]
        loss = F.dpo_loss(
            F.sequence_logprob(step.student(step.alternative), chosen),
            step.reference("alternative").sequence_logprob(chosen),
            F.sequence_logprob(step.student(step.forget), rejected),
            step.reference("forget").sequence_logprob(rejected),
            self.params["beta"],
        )
        return Term(loss, "forget", "rows")  # one preference pair per forget row

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(
            step,
            "forget_dpo",
            self._dpo,
            self.params["forget_weight"],
            self.params["retain_loss"],
            self.params["retain_weight"],
        )
