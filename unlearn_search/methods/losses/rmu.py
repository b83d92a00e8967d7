import torch

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.methods import functional as F
from unlearn_search.methods.base import Knob, LossOutput, Method, StepInputs, Term, shared_value


class RMU(Method):
    """Representation misdirection (Li et al. 2024, WMDP, arXiv 2403.03218, eq. 1-3):

    ``gamma * mean_t |h_L(x_f)_t - c u|^2 + alpha * mean_t |h_L(x_r)_t - h0_L(x_r)_t|^2``

    ``h_L`` the student's output of decoder layer ``L`` on the forget (``x_f``) and retain
    (``x_r``) answer tokens, ``h0_L`` the frozen original's, ``u`` a fixed random unit vector and
    ``c`` the steering coefficient (``functional.activation_mse``, ``steering_direction``). As in
    the authors' code, only the MLP output projections of layer ``L`` and the two below it train
    (``trainable: method``). The retain term is the paper's activation distance (open-unlearning's
    ``EMBED_DIFF``); the control vector is drawn from a fixed seed rather than once per process.
    """

    name = "rmu"
    summary = "steers one layer's hidden states on forget tokens towards a scaled random vector, keeps retain's"
    reference_paper = "Li et al. 2024, The WMDP Benchmark, RMU (arXiv 2403.03218)"
    # The authors' defaults as open-unlearning ships them (RMU.yaml: layer 7 of a 32-layer model,
    # layers 5-7's mlp.down_proj trained, steering coefficient 300, alpha 1000, gamma 1).
    knobs = (
        Knob(
            "layer",
            None,
            "decoder layer (0-based) whose output is steered; null: the one a quarter of the way up, "
            "as the authors' layer 7 of 32",
            low=0,
            kind=int,
            nullable=True,
        ),
        Knob(
            "steering_coeff", 300.0, "norm c of the random vector the forget activations are steered to", positive=True
        ),
        Knob("forget_weight", 1.0, "weight of the steering term (the authors' gamma)", low=0),
        Knob("retain_weight", 1000.0, "weight of the retain activations' distance to the original's (alpha)", low=0),
        Knob("trained_layers", 3, "with trainable=method: the layers trained, up to and with the steered one", low=1),
        Knob("trained_module", "mlp.down_proj", "with trainable=method: the module trained in each of those layers"),
    )
    needs_retain = True
    needs_reference = True
    reads_hidden = True

    def student_batches(self) -> tuple[str, ...]:
        return ("forget", "retain")  # hidden states only; the logits of the same pass go unread

    def probed_layer(self, layers: int) -> int:
        layer = self.params["layer"]
        if layer is None:
            return max(0, round(layers / 4) - 1)
        if layer >= layers:
            raise UnlearnSearchError(
                f"method rmu: layer={layer} (expected 0 to {layers - 1}, the model's decoder layers)"
            )
        return layer

    def trained_modules(self, layers: int) -> tuple[tuple[int, str], ...]:
        top = self.probed_layer(layers)
        first = max(0, top - self.params["trained_layers"] + 1)
        return tuple((index, self.params["trained_module"]) for index in range(first, top + 1))

    def loss(self, step: StepInputs) -> LossOutput:
        total, parts = torch.zeros(()), {}
        if step.forget is not None:
            hidden = step.hidden(step.forget)
            target = F.steering_direction(hidden.shape[-1], self.params["steering_coeff"])
            value = shared_value(step, Term(F.activation_mse(hidden, target, step.forget["labels"]), "forget", "rows"))
            total = total + self.params["forget_weight"] * step.forget_scale * value
            parts["forget_steer"] = float(value.detach())
        if step.retain is not None:
            hidden = step.hidden(step.retain)
            original = step.reference("retain").hidden
            value = shared_value(
                step, Term(F.activation_mse(hidden, original, step.retain["labels"]), "retain", "rows")
            )
            total = total + self.params["retain_weight"] * step.retain_scale * value
            parts["retain_activation"] = float(value.detach())
        return LossOutput(total, parts)
