import torch

from unlearn_search.methods import functional as F
from unlearn_search.methods.base import RETAIN_KINDS, Knob, LossOutput, Method, StepInputs, Term, compose


class Adversarial(Method):
    name = "adversarial"
    summary = "fine-tune each forget answer position towards the model's own most likely wrong token"
    reference_paper = "Yao et al. 2024, Machine Unlearning of Pre-trained LLMs (arXiv 2402.15159)"
    knobs = (
        Knob("forget_weight", 1.0, "weight of the adversarial cross-entropy", low=0),
        Knob("retain_loss", "ce", "retain term", RETAIN_KINDS),
        Knob("retain_weight", 1.0, "weight of the retain term", low=0),
    )
    needs_retain = True

    def uses_reference(self) -> bool:
        return self.params["retain_loss"] == "kl"

    @staticmethod
    def _adversarial(step: StepInputs):
        logits = step.student(step.forget)
        with torch.no_grad():
            targets = F.adversarial_targets(logits.detach(), step.forget["labels"])
        # The targets are scored where the labels are: the forget batch's tokens.
        return Term(F.cross_entropy(logits, targets), "forget", "tokens")

    def loss(self, step: StepInputs) -> LossOutput:
        return compose(
            step,
            "forget_adversarial_ce",
            self._adversarial,
            self.params["forget_weight"],
            self.params["retain_loss"],
            self.params["retain_weight"],
        )
