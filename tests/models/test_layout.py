"""sdtrain.models.layout: diffusers' `.contiguous()` copies in front of convolutions leave a compiled
channels-last U-Net's graph, and its outputs and gradients stay those of the eager U-Net."""

from __future__ import annotations

import torch

from sdtrain.demo.tiny import build_unet
from sdtrain.models import layout, speed


def _contiguous_calls(gm: torch.fx.GraphModule) -> int:
    return sum(n.op == "call_method" and n.target == "contiguous" for n in gm.graph.nodes)


def _step(unet, x, t, ctx):
    unet.zero_grad(set_to_none=True)
    out = unet(x, t, encoder_hidden_states=ctx).sample
    (out.float() ** 2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}


def test_compiled_channels_last_unet_has_no_layout_copies_and_same_gradients():
    torch.manual_seed(0)
    unet = build_unet(8).to(memory_format=torch.channels_last).train()
    # 64 images: diffusers' upsampler adds its own .contiguous() from that batch size on
    x = torch.randn(64, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    t, ctx = torch.randint(0, 1000, (64,)), torch.randn(64, 77, 32)
    want_out, want_grads = _step(unet, x, t, ctx)

    seen = []  # (contiguous calls the graph came with, calls left when the inner backend got it)

    def inner(gm, example_inputs):
        seen.append(_contiguous_calls(gm))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def record_before(gm, example_inputs):
        before = _contiguous_calls(gm)
        compiled = layout.backend(inner)(gm, example_inputs)
        seen[-1] = (before, seen[-1])
        return compiled

    torch._dynamo.reset()
    speed.compile_unet(unet, "unet", drop_layout_copies=True, backend=record_before)
    got_out, got_grads = _step(unet, x, t, ctx)
    torch._dynamo.reset()

    assert len(seen) == 1  # one graph: nothing broke it
    before, after = seen[0]
    # 7 ResNet shortcuts (training mode), 7 Transformer2D outputs, 2 upsamplers (batch >= 64)
    assert before == 16 and after == 0, seen
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_only_copies_feeding_convolutions_go():
    """A .contiguous() whose value reaches a layout-dependent call (a view) stays."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            a = self.conv(x.permute(0, 1, 3, 2).contiguous())  # goes
            b = x.permute(0, 1, 3, 2).contiguous().view(x.shape[0], -1)  # stays: a view
            up = torch.nn.functional.interpolate(x.contiguous(), scale_factor=2.0)  # goes
            return a.sum() + b.sum() + self.conv(up).sum()

    gm = torch.fx.symbolic_trace(Net())
    assert _contiguous_calls(gm) == 3
    assert layout.drop_layout_copies(gm) == 2
    assert _contiguous_calls(gm) == 1
    x = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(gm(x), Net.forward(gm, x))


def _all_contiguous_calls(gm: torch.fx.GraphModule) -> int:
    return sum(_contiguous_calls(m) for m in gm.modules() if isinstance(m, torch.fx.GraphModule))


def _checkpoint_regions(gm: torch.fx.GraphModule) -> int:
    return sum(
        n.op == "call_function" and "checkpoint" in str(n.target)
        for m in gm.modules()
        if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.nodes
    )


def test_repeated_compile_checkpoints_inside_each_layer_with_the_same_gradients():
    """compile=repeated with gradient checkpointing: each ResNet / transformer layer's checkpoint
    is in its own compiled graph (not around it), the layout copies leave the checkpointed body
    too, and outputs and gradients are the eager checkpointed U-Net's."""
    torch.manual_seed(0)
    unet = build_unet(8).to(memory_format=torch.channels_last).train()
    unet.enable_gradient_checkpointing()
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    t, ctx = torch.randint(0, 1000, (2,)), torch.randn(2, 77, 32)
    want_out, want_grads = _step(unet, x, t, ctx)

    seen = []  # per graph: (checkpoint regions, contiguous calls before, after)

    def inner(gm, example_inputs):
        seen[-1] += (_all_contiguous_calls(gm),)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def record(gm, example_inputs):
        seen.append((_checkpoint_regions(gm), _all_contiguous_calls(gm)))
        return layout.backend(inner)(gm, example_inputs)

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    speed.compile_unet(unet, "repeated", drop_layout_copies=True, backend=record)
    got_out, got_grads = _step(unet, x, t, ctx)
    with torch.no_grad():  # sampling and validation: no checkpoint, still no graph break
        want_eval = unet.eval()(x, t, encoder_hidden_states=ctx).sample
    breaks = dict(counters["graph_break"])
    torch._dynamo.reset()

    assert not breaks, breaks
    train_graphs = [g for g in seen if g[0] == 1]  # one checkpoint a training graph
    assert train_graphs and len(train_graphs) + sum(g[0] == 0 for g in seen) == len(seen), seen
    seen = train_graphs
    assert sum(before for _, before, _ in seen) > 0, seen  # the ResNets' shortcut copies
    assert all(after == 0 for _, _, after in seen), seen
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(want_eval, got_out, rtol=1e-4, atol=1e-5)  # dropout 0: same maths
