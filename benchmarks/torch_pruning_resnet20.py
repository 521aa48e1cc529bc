"""Why cnnmod follows channels itself: Torch-Pruning on the shared ResNet-20 (option-A shortcuts).

    pip install torch-pruning && python benchmarks/torch_pruning_resnet20.py
Prints, for the zoo model and for cnnmod's traced (BatchNorm-folded) parent, how many layers Torch-Pruning ties
to the stem's channels, and whether pruning three of them leaves a network that runs; then the channel spaces
cnnmod finds (cnnmod.engine.channels).
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from common import MODEL

from cnnmod.engine.channels import channel_plan
from cnnmod.engine.inputs import InputSpec
from cnnmod.engine.modules import Parent
from cnnmod.zoo import create_model, load_weights


def main() -> None:
    model = load_weights(create_model("resnet20", num_classes=10), MODEL).eval()
    parent = Parent.from_model(model, InputSpec.default((32, 32), 3), [str(i) for i in range(10)], "resnet20")
    x = torch.randn(4, 3, 32, 32)
    for name, net in (("zoo model", copy.deepcopy(model)), ("traced parent", copy.deepcopy(parent.model.graph))):
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=x)
        group = graph.get_pruning_group(net.conv1, tp.prune_conv_out_channels, idxs=[0, 3, 5])
        print(f"torch-pruning, {name}: the stem's channels tie {len(group)} dependencies")
        group.prune()
        try:
            net(x)
            print("  pruned network runs")
        except RuntimeError as e:
            print(f"  pruned network fails: {str(e).splitlines()[0]}")
    plan = channel_plan(parent.model)
    print(f"cnnmod: {len(plan.spaces)} channel spaces, {len(plan.maps)} channel maps (the option-A pads); "
          f"sizes {[s.size for s in plan.spaces]}")


if __name__ == "__main__":
    main()
