"""Print the README's model table: every registered KAN-ViT / DeiT-JAX model, its size and FFN.

python benchmarks/model_table.py
"""

import timm
import torch

import kan_vit  # noqa: F401  (registers the models)


def main():
    print("| timm name | params (1000 classes) | feed-forward |")
    print("|---|---:|---|")
    for name in timm.list_models("kan_vit*") + timm.list_models("deit_jax*"):
        with torch.device("meta"):  # sizes only: no memory, no init
            model = timm.create_model(name)
        params = sum(p.numel() for p in model.parameters())
        block = model.blocks[0].mlp
        if model.use_kan:
            ffn = f"Chebyshev-KAN, degree {block.kan.degree}, {block.kan.in_features}->{block.kan.out_features}"
        else:
            ffn = f"MLP {block.fc1.in_features}->{block.fc1.out_features}->{block.fc2.out_features}, tanh-GELU"
        print(f"| `{name}` | {params:,} | {ffn} |")


if __name__ == "__main__":
    main()
