"""Tests of reseg_unet.py: blocks, the released network, Eqs. (1)-(8), the two-stage CLI."""
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import reseg_unet as m

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--img-size", "32", "--batch-size", "4", "--toy-sizes", "8,4,3"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine spinning threads cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- blocks and the model ----

def test_block_shapes():
    x = torch.rand(2, 6, 20, 20)
    assert m.DoubleConv(6, 10)(x).shape == (2, 10, 20, 20)
    assert m.Down(6, 12)(x).shape == (2, 12, 10, 10)
    deep, skip = torch.rand(2, 16, 5, 5), torch.rand(2, 8, 11, 11)  # odd skip: padded
    assert m.Up(16, 8)(deep, skip).shape == (2, 8, 11, 11)
    assert m.OutConv(6, 9)(x).shape == (2, 9, 20, 20)


def test_model_features_and_mid_choice():
    net = m.build_model("tiny", 9).eval()  # widths 4, 8, 16, 32, 64
    out = net(torch.rand(2, 1, 32, 32))  # a 1-channel image is repeated to 3 channels
    assert out.logits.shape == (2, 9, 32, 32)
    assert [tuple(f.shape[1:]) for f in out.encoder] == [(8, 16, 16), (16, 8, 8), (32, 4, 4),
                                                          (64, 2, 2)]
    assert [tuple(f.shape[1:]) for f in out.decoder] == [(32, 4, 4), (16, 8, 8), (8, 16, 16)]
    assert out.mid is out.encoder[3]  # paper: the bottleneck
    released = m.build_model("tiny", 9, as_released=True).eval()(torch.rand(1, 3, 32, 32))
    assert released.mid is released.decoder[0]  # authors' code: u1 (spec 3.2)
    recon = m.build_model("tiny", 4, role="recon").eval()
    assert recon(torch.randint(0, 4, (2, 32, 32))).logits.shape == (2, 4, 32, 32)


def test_paper_preset_parameter_count():
    # spec 1.4: 31,038,153 (9 classes, 3-channel input); 31,037,828 for ACDC's 4 classes
    for classes, expected in ((9, 31_038_153), (4, 31_037_828)):
        count = sum(p.numel() for p in m.build_model("paper", classes).parameters())
        assert count == expected and abs(count / 31.04e6 - 1) < 0.01


def released_key_names():
    """The 118 keys of the authors' state_dict, written from the pattern of spec 1.5."""
    def double(prefix):
        keys = []
        for conv, bn in ((0, 1), (3, 4)):
            keys.append(f"{prefix}.double_conv.{conv}.weight")
            keys += [f"{prefix}.double_conv.{bn}.{n}" for n in
                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        return keys
    keys = double("inc")
    for k in range(1, 5):
        keys += double(f"down{k}.maxpool_conv.1")
    for k in range(1, 5):
        keys += [f"up{k}.up.weight", f"up{k}.up.bias"] + double(f"up{k}.conv")
    return keys + ["outc.conv.weight", "outc.conv.bias"]


def functional_unet(state, x):
    """The released U-Net written out from spec 1.1 with F.* calls on a state_dict (eval BN)."""
    def double(prefix, h):
        for conv, bn in ((0, 1), (3, 4)):
            h = F.conv2d(h, state[f"{prefix}.double_conv.{conv}.weight"], padding=1)
            h = F.batch_norm(h, state[f"{prefix}.double_conv.{bn}.running_mean"],
                             state[f"{prefix}.double_conv.{bn}.running_var"],
                             state[f"{prefix}.double_conv.{bn}.weight"],
                             state[f"{prefix}.double_conv.{bn}.bias"], False, 0.0, 1e-5)
            h = F.relu(h)
        return h
    feats = [double("inc", x)]
    for k in range(1, 5):
        feats.append(double(f"down{k}.maxpool_conv.1", F.max_pool2d(feats[-1], 2)))
    h = feats[4]
    for k in range(1, 5):
        h = F.conv_transpose2d(h, state[f"up{k}.up.weight"], state[f"up{k}.up.bias"], stride=2)
        h = double(f"up{k}.conv", torch.cat([feats[4 - k], h], dim=1))
    return F.conv2d(h, state["outc.conv.weight"], state["outc.conv.bias"])


def test_released_state_dict_loads_strictly_and_gives_the_same_logits(tmp_path):
    keys = list(m.build_model("paper", 9, as_released=True).state_dict())
    assert len(keys) == 118 and set(keys) == set(released_key_names())
    # a checkpoint as the authors save it: a plain state_dict with trained-looking BN buffers
    source = m.build_model("tiny", 9, as_released=True)
    source.train()(torch.rand(4, 3, 32, 32))  # moves the running statistics away from 0 / 1
    torch.save(source.state_dict(), tmp_path / "epoch_149.pth")
    net = m.load_released_weights(m.build_model("tiny", 9, as_released=True),
                                  tmp_path / "epoch_149.pth").eval()
    x = torch.rand(2, 3, 32, 32)
    state = torch.load(tmp_path / "epoch_149.pth")
    assert torch.allclose(net(x).logits, functional_unet(state, x), atol=1e-5)
    with pytest.raises(common.UserError):  # a 4-class file into a 9-class net: one line
        torch.save(m.build_model("tiny", 4).state_dict(), tmp_path / "acdc.pth")
        m.load_released_weights(m.build_model("tiny", 9), tmp_path / "acdc.pth")


# ---- wiring of the U-Net (Fig. 1): forward hooks name every block's inputs ----

def record_blocks(net):
    """Forward hooks on every block: {name: (inputs tuple, output)}."""
    seen, handles = {}, []
    for name in ("inc", "down1", "down2", "down3", "down4", "up1", "up2", "up3", "up4", "outc"):
        hook = lambda mod, args, out, name=name: seen.__setitem__(name, (args, out))  # noqa
        handles.append(getattr(net, name).register_forward_hook(hook))
    return seen, handles


def random_bn(net, seed):
    """Distinct random weights and BN statistics, so no wiring mistake can hide behind zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + (0.5 if "var" in name else 0))
    return net


def test_every_block_receives_the_tensors_of_the_figure():
    torch.manual_seed(1)
    net = random_bn(m.build_model("tiny", 3), 1).eval()
    seen, _ = record_blocks(net)
    x = torch.rand(2, 3, 32, 48)  # batch 2, 3 channels, non-square
    out = net(x)
    x1, x2, x3, x4, x5 = (seen[n][1] for n in ("inc", "down1", "down2", "down3", "down4"))
    u1, u2, u3, u4 = (seen[n][1] for n in ("up1", "up2", "up3", "up4"))
    assert torch.equal(seen["inc"][0][0], x)
    for block, source in (("down1", x1), ("down2", x2), ("down3", x3), ("down4", x4),
                          ("outc", u4)):
        assert seen[block][0][0] is source, block
    for block, (deep, skip) in (("up1", (x5, x4)), ("up2", (u1, x3)), ("up3", (u2, x2)),
                                ("up4", (u3, x1))):  # Up(deep, skip): the U-Net's skips
        assert seen[block][0][0] is deep and seen[block][0][1] is skip, block
    assert all(a is b for a, b in zip(out.encoder, [x2, x3, x4, x5]))
    assert all(a is b for a, b in zip(out.decoder, [u1, u2, u3]))
    assert out.mid is x5 and out.logits is seen["outc"][1]
    assert out.logits.shape == (2, 3, 32, 48)


def test_recon_net_reads_raw_class_ids_as_intensities():
    net = m.build_model("tiny", 4, role="recon").eval()
    seen, _ = record_blocks(net)
    labels = torch.tensor([[[0, 1, 2, 3] * 12] * 32, [[3, 3, 1, 0] * 12] * 32])  # (2, 32, 48)
    net(labels)
    fed = seen["inc"][0][0]  # (2, 3, 32, 48): ids 0..3 on three channels, not scaled
    assert fed.shape == (2, 3, 32, 48) and fed.dtype == torch.float32
    assert torch.equal(fed[:, 2], labels.float()) and torch.equal(fed[:, 0], fed[:, 1])


# ---- Eqs. (1)-(3): stage 1 ----

def test_eq1_eq2_eq3_average_over_batch_channels_and_pixels():
    x = torch.tensor([1.0, 2, 3, 4, 0, 0, 0, 2]).view(2, 2, 1, 2)  # B 2, C 2, H 1, W 2
    x_hat = torch.zeros(2, 2, 1, 2)
    assert m.mse_loss(x, x_hat).item() == pytest.approx(34 / 8)  # (1+4+9+16+4) / (B C H W)
    assert m.l1_loss(x, x_hat).item() == pytest.approx(12 / 8)
    assert m.recon_loss(x, x_hat).item() == pytest.approx(0.6 * 4.25 + 0.4 * 1.5)  # Eq. (3)
    assert m.recon_loss(x, x_hat, 1.0, 0.0).item() == pytest.approx(4.25)
    with pytest.raises(AssertionError):  # no silent broadcasting
        m.mse_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))


def test_recon_targets_image_and_gt():
    labels = torch.tensor([[[0, 2], [1, 2]], [[1, 1], [0, 0]]])  # (2, 2, 2)
    images = torch.arange(24.0).view(2, 3, 2, 2)
    gt = m.recon_target(labels, images, 3, "gt")  # one-hot GT (2, 3, 2, 2)
    assert gt.shape == (2, 3, 2, 2) and gt[0, 2].tolist() == [[0, 1], [0, 1]]
    assert gt[1, 1].tolist() == [[1, 1], [0, 0]]
    image = m.recon_target(labels, images, 3, "image")  # the slice on every channel
    assert image.shape == (2, 3, 2, 2)
    assert torch.equal(image[1, 2], images[1].mean(0)) and torch.equal(image[0, 0], image[0, 1])


# ---- Eqs. (4)-(7): three-level cross-feature alignment ----

def fake_output(encoder_values, decoder_values, mid_value, batch=2):
    """UNetOutput with constant features of the tiny preset's shapes (levels differ)."""
    enc_shapes = [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    dec_shapes = [(32, 4, 4), (16, 8, 8), (8, 16, 16)]
    encoder = [torch.full((batch, *s), float(v)) for s, v in zip(enc_shapes, encoder_values)]
    decoder = [torch.full((batch, *s), float(v)) for s, v in zip(dec_shapes, decoder_values)]
    return m.UNetOutput(torch.zeros(batch, 9, 32, 32), torch.full((batch, 64, 2, 2), mid_value),
                        encoder, decoder)


def test_eq4_single_term_is_a_per_element_mean_over_the_batch():
    f_recon, f_seg = torch.zeros(2, 2, 2, 2), torch.zeros(2, 2, 2, 2)
    f_seg[0, 1, 0, 1] = 2.0  # sample 0: 2^2 / (2 * 2 * 2) = 0.5; sample 1: 0
    assert m.feature_mse(f_recon, f_seg).item() == pytest.approx(0.25)  # batch mean


def test_eq4_to_eq7_cross_pairing_with_nonzero_features():
    seg = fake_output([1, 2, 3, 4], [5, 6, 7], 8.0)  # seg x2..x5, u1..u3, mid
    rec = fake_output([10, 20, 30, 40], [50, 60, 70], 80.0)
    l_align, terms = m.alignment_loss(seg, rec)
    # Eq. (4), l = 1 deepest: rec x4 (30) vs seg u1 (5); l = 2: x3 (20) vs u2 (6); x2 vs u3
    assert [terms[f"e2d{l}"].item() for l in (1, 2, 3)] == [625, 196, 9]
    # Eq. (5): rec u1 (50) vs seg x4 (3); u2 (60) vs x3 (2); u3 (70) vs x2 (1)
    assert [terms[f"d2e{l}"].item() for l in (1, 2, 3)] == [2209, 3364, 4761]
    assert terms["mid"].item() == 5184  # Eq. (6): 80 vs 8
    assert l_align.item() == pytest.approx(16348 / 3)  # Eq. (7): 7 terms / 3


def test_alignment_pairs_the_real_networks_blocks():
    seg_net = random_bn(m.build_model("tiny", 3), 2).eval()
    rec_net = random_bn(m.build_model("tiny", 3, role="recon"), 3).eval()
    seg_seen, _ = record_blocks(seg_net)
    rec_seen, _ = record_blocks(rec_net)
    seg = seg_net(torch.rand(2, 3, 32, 48))
    rec = rec_net(torch.randint(0, 3, (2, 32, 48)))
    _, terms = m.alignment_loss(seg, rec)
    pairs = {"e2d1": ("down3", "up1"), "e2d2": ("down2", "up2"), "e2d3": ("down1", "up3"),
             "d2e1": ("up1", "down3"), "d2e2": ("up2", "down2"), "d2e3": ("up3", "down1"),
             "mid": ("down4", "down4")}  # (recon block, seg block), Fig. 1(b)
    for term, (rec_block, seg_block) in pairs.items():
        expected = F.mse_loss(seg_seen[seg_block][1], rec_seen[rec_block][1])
        assert terms[term].item() == pytest.approx(expected.item(), rel=1e-5), term


@pytest.mark.parametrize("groups,names", [
    (["e2d"], {"e2d1", "e2d2", "e2d3"}), (["d2e"], {"d2e1", "d2e2", "d2e3"}), (["mid"], {"mid"}),
    (["e2d", "mid"], {"e2d1", "e2d2", "e2d3", "mid"})])
def test_align_groups_switch_only_their_terms(groups, names):
    seg, rec = fake_output([1, 2, 3, 4], [5, 6, 7], 8.0), fake_output([10, 20, 30, 40],
                                                                      [50, 60, 70], 80.0)
    _, full = m.alignment_loss(seg, rec)
    l_align, terms = m.alignment_loss(seg, rec, groups)
    assert set(terms) == names and all(terms[k] == full[k] for k in names)
    assert l_align.item() == pytest.approx(sum(full[k].item() for k in names) / 3)


def test_mid_feature_switch_changes_only_the_eq6_term():
    torch.manual_seed(4)
    nets = {}
    for choice in ("bottleneck", "up1"):
        torch.manual_seed(4)
        nets[choice] = m.build_model("tiny", 3, mid_feature=choice).eval()
    x = torch.rand(2, 3, 32, 48)
    a, b = nets["bottleneck"](x), nets["up1"](x)
    assert a.mid is a.encoder[3] and b.mid is b.decoder[0]
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(p, q) for p, q in zip(a.encoder + a.decoder, b.encoder + b.decoder))


# ---- Eq. (8) and TransUNet's Dice ----

def test_dice_loss_is_pooled_over_the_batch_as_transunet():
    labels = torch.tensor([[[1, 1], [1, 1]], [[0, 0], [0, 0]]])  # two different masks
    logits = torch.zeros(2, 2, 2, 2)
    logits[:, 1] = 30.0  # both predict class 1 everywhere
    # pooled: class 0 1 - 1e-5 / (4 + 1e-5) ~ 1, class 1 1 - 8 / (8 + 4) = 1/3 -> mean 2/3
    assert m.dice_loss(logits, labels).item() == pytest.approx(2 / 3, abs=1e-4)
    # per sample it would be (0 + 1) / 2: the batch pooling is TransUNet's (spec 3.4)


def test_eq8_total_loss_weights_and_lambda():
    logits = torch.zeros(2, 2, 2, 2)  # uniform: p = 0.5 everywhere
    labels = torch.zeros(2, 2, 2, dtype=torch.long)
    # class 0: 1 - (2*4)/(2 + 8) = 0.2; class 1: 1 - 0/(2 + 0) = 1 -> mean 0.6
    assert m.dice_loss(logits, labels).item() == pytest.approx(0.6, abs=1e-5)
    l_seg = m.seg_loss(logits, labels).item()
    assert l_seg == pytest.approx(0.5 * math.log(2) + 0.5 * 0.6, abs=1e-5)
    assert m.seg_loss(logits, labels, 1.0, 0.0).item() == pytest.approx(math.log(2), abs=1e-6)
    seg = fake_output([1, 2, 3, 4], [5, 6, 7], 8.0)
    seg = m.UNetOutput(logits, seg.mid, seg.encoder, seg.decoder)
    rec = fake_output([10, 20, 30, 40], [50, 60, 70], 80.0)
    for lam in (0.035, 0.5):
        total, align = m.total_loss(seg, labels, rec, lam=lam)
        assert align == pytest.approx(16348 / 3)
        assert total.item() == pytest.approx(l_seg + lam * 16348 / 3, rel=1e-6)
    baseline, align = m.total_loss(seg, labels, rec, lam=0.0)  # --lam 0: plain U-Net
    assert align == 0.0 and baseline.item() == pytest.approx(l_seg, abs=1e-6)


def test_alignment_gradient_reaches_the_encoder_not_the_head_and_never_the_frozen_net():
    seg_net = random_bn(m.build_model("tiny", 3), 5).train()
    rec_net = m.build_model("tiny", 3, role="recon").requires_grad_(False)
    with torch.no_grad():
        rec = rec_net(torch.randint(0, 3, (2, 32, 48)))
    l_align, _ = m.alignment_loss(seg_net(torch.rand(2, 3, 32, 48)), rec)
    l_align.backward()
    assert seg_net.inc.double_conv[0].weight.grad.abs().sum() > 0  # spec 3.2 [M]
    assert seg_net.up3.conv.double_conv[0].weight.grad.abs().sum() > 0
    assert seg_net.outc.conv.weight.grad is None and seg_net.up4.up.weight.grad is None
    assert all(p.grad is None for p in rec_net.parameters())


# ---- train_one_epoch: what each network is fed, BN mode, schedule, lambda ----

def make_args(**changes):
    args = m.build_parser().parse_args(TINY + [f"--{k.replace('_', '-')}={v}"
                                               for k, v in changes.items()])
    args = m.finish_method_args(common.finish_args(args, m.PAPER_RECIPE, m.TOY_RECIPE))
    args.num_classes = 9
    return args


def two_batches(seed=0):
    """Two (B 2, 3, 32, 48) batches of distinct slices and label maps."""
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(2, 3, 32, 48, generator=g),
             "mask": torch.randint(0, 9, (2, 32, 48), generator=g)} for _ in range(2)]


def stage2_nets(seed=0):
    torch.manual_seed(seed)
    seg = m.build_model("tiny", 9)
    rec = random_bn(m.build_model("tiny", 9, role="recon"), seed + 7).requires_grad_(False)
    return seg, rec


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def test_frozen_net_gets_the_same_batchs_labels_and_the_seg_net_the_images():
    args = make_args()
    seg, rec = stage2_nets()
    fed = {"seg": [], "rec": []}
    seg.register_forward_pre_hook(lambda mod, a: fed["seg"].append(a[0]))
    rec.register_forward_pre_hook(lambda mod, a: fed["rec"].append(a[0]))
    batches = two_batches()
    m.train_one_epoch(seg, batches, sgd(seg), torch.device("cpu"), args, "seg", rec,
                      show=False, total_iterations=2)
    assert all(torch.equal(f, b["mask"]) for f, b in zip(fed["rec"], batches))
    assert all(torch.equal(f, b["image"]) for f, b in zip(fed["seg"], batches))
    assert all(p.grad is None for p in rec.parameters())


@pytest.mark.parametrize("mode", ["batch", "eval"])
def test_frozen_net_batchnorm_mode_follows_recon_bn(mode):
    args = make_args(recon_bn=mode)
    seg, rec = stage2_nets()
    modes, before = [], copy_state(rec)
    rec.inc.double_conv[1].register_forward_hook(lambda mod, a, o: modes.append(mod.training))
    m.train_one_epoch(seg, two_batches(), sgd(seg), torch.device("cpu"), args, "seg", rec,
                      show=False, total_iterations=2)
    assert modes == [mode == "batch"] * 2
    after = rec.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k
               and "num_batches" not in k)  # frozen: no parameter moves in either mode
    moved = any(not torch.equal(before[k], after[k]) for k in before if "running" in k)
    assert moved == (mode == "batch")  # the authors' mode updates the unused buffers


def copy_state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("target", ["image", "gt"])
def test_stage1_loss_uses_the_chosen_target(target):
    args = make_args(recon_target=target, limit_batches=1)
    torch.manual_seed(0)
    net = m.build_model("tiny", 9, role="recon")
    outputs = []
    net.outc.register_forward_hook(lambda mod, a, o: outputs.append(o.detach()))
    batch = two_batches()[0]
    loss = m.train_one_epoch(net, [batch], sgd(net), torch.device("cpu"), args, "recon",
                             show=False)["loss"]
    x = outputs[0]
    expected = {"image": batch["image"].mean(1, keepdim=True).expand_as(x),
                "gt": F.one_hot(batch["mask"], 9).permute(0, 3, 1, 2).float()}[target]
    assert loss == pytest.approx((0.6 * ((x - expected) ** 2).mean()
                                  + 0.4 * (x - expected).abs().mean()).item(), rel=1e-5)


def test_lambda_reaches_the_training_loss():
    losses = {}
    for lam in (0.035, 0.5):
        seg, rec = stage2_nets()
        args = make_args(lam=lam, limit_batches=1)
        losses[lam] = m.train_one_epoch(seg, two_batches()[:1], sgd(seg), torch.device("cpu"),
                                        args, "seg", rec, show=False)
    assert losses[0.5]["align"] == pytest.approx(losses[0.035]["align"], rel=1e-5)
    assert losses[0.5]["loss"] - losses[0.035]["loss"] == pytest.approx(
        0.465 * losses[0.5]["align"], rel=1e-4)


def test_poly_schedule_sets_every_iterations_lr():
    args = make_args(lr=0.01)
    seg, rec = stage2_nets()
    optimizer = sgd(seg)
    seen, step = [], optimizer.step
    optimizer.step = lambda *a, **k: (seen.append(optimizer.param_groups[0]["lr"]), step())
    m.train_one_epoch(seg, two_batches(), optimizer, torch.device("cpu"), args, "seg", rec,
                      show=False, iteration=2, total_iterations=4)
    assert seen == pytest.approx([0.01 * 0.5 ** 0.9, 0.01 * 0.25 ** 0.9])  # 0.00536, 0.00287


def test_a_label_beyond_the_class_count_stops_with_one_line():
    args = make_args()
    args.num_classes = 8  # the batches hold ids 0..8: one too many
    seg, rec = stage2_nets()
    with pytest.raises(common.UserError, match="id 8"):
        m.train_one_epoch(seg, two_batches(), sgd(seg), torch.device("cpu"), args, "seg", rec,
                          show=False)


@pytest.mark.parametrize("flag,attribute,value", [
    ("--recon-target=gt", "recon_target", "gt"), ("--mid-feature=up1", "mid_feature", "up1"),
    ("--recon-bn=eval", "recon_bn", "eval"), ("--lam=0.1", "lam", 0.1),
    ("--resize=bilinear", "resize", "bilinear"), ("--align-groups=mid", "align_groups", ["mid"]),
    ("--as-released", "mid_feature", "up1")])
def test_each_switch_changes_only_what_it_names(flag, attribute, value):
    parse = lambda extra: vars(m.finish_method_args(common.finish_args(  # noqa: E731
        m.build_parser().parse_args(TINY + extra), m.PAPER_RECIPE, m.TOY_RECIPE)))
    base, changed = parse([]), parse([flag])
    differs = {k for k in base if base[k] != changed[k]}
    assert changed[attribute] == value and differs <= {attribute, "as_released"}
    assert (base["recon_target"], base["mid_feature"], base["recon_bn"]) == (
        "image", "bottleneck", "batch")  # the defaults the docstring argues for


# ---- data: TransUNet's augmentation and resizing, class counting ----

def test_transunet_augment_moves_image_and_label_together():
    import random
    labels = np.arange(48).reshape(6, 8) % 5
    for seed in range(12):
        image, out = m.transunet_augment(labels.astype(np.float32), labels, random.Random(seed))
        assert np.array_equal(image, out.astype(np.float32))


def test_slice_resize_is_transuNets_cubic_zoom(tmp_path):
    from scipy.ndimage import zoom  # TransUNet's call: zoom(image, (S/x, S/y), order=3)
    rng = np.random.default_rng(0)
    image, label = rng.random((16, 24)).astype(np.float32), rng.integers(0, 4, (16, 24))
    for split in ("train", "valid", "test"):
        (tmp_path / split).mkdir()
        np.savez(tmp_path / split / "case0.npz", img=image, label=label)
    run = common.Run(make_args(out=str(tmp_path / "o")), m.SCRIPT)
    for resize in ("cubic", "bilinear"):  # --resize, through load_method_data
        args = make_args(data=str(tmp_path), resize=resize, augment="off", img_size=48)
        data = m.load_method_data(args, run, None)
        for item in (data["train"][0], data["val"][0]):  # training and validation alike
            cubic = np.allclose(item["image"][1].numpy(), zoom(image, (3, 2), order=3),
                                atol=1e-6)
            assert cubic == (resize == "cubic"), resize
            assert item["mask"].shape == (48, 48)
        if resize == "cubic":
            assert np.array_equal(item["mask"].numpy(), zoom(label, (3, 2), order=0))


class Probe(torch.nn.Module):
    """A stand-in segmentation net: fixed random logits (or one class), records its inputs."""

    def __init__(self, classes=3, constant=None):
        super().__init__()
        self.classes, self.constant, self.fed = classes, constant, []

    def forward(self, x):
        self.fed.append(x)
        g = torch.Generator().manual_seed(len(self.fed))
        logits = torch.rand(x.shape[0], self.classes, *x.shape[2:], generator=g)
        if self.constant is not None:
            logits[:, self.constant] += 10
        return m.UNetOutput(logits, None, [], [])


def test_predict_feeds_cubic_slices_and_resizes_back_nearest():
    from scipy.ndimage import zoom  # TransUNet's test_single_volume calls
    probe = Probe()
    volume = np.random.default_rng(1).random((2, 24, 40)).astype(np.float32)
    pred = m.predict(probe, volume, 32, torch.device("cpu"))
    assert pred.shape == (2, 24, 40)
    assert np.allclose(probe.fed[0][1, 0].numpy(), zoom(volume[1], (32 / 24, 32 / 40), order=3),
                       atol=1e-6)
    at_s = Probe()(probe.fed[0]).logits.argmax(1).numpy()  # the same logits again: (2, 32, 32)
    assert np.array_equal(pred, np.stack([zoom(p, (24 / 32, 40 / 32), order=0) for p in at_s]))


def test_validation_dice_is_foreground_only_and_pooled():
    args = make_args()
    args.num_classes = 3
    labels = torch.zeros(2, 4, 6, dtype=torch.long)
    labels[0, :2] = 1  # sample 0: half class 1; sample 1: background only
    items = [{"image": torch.rand(3, 4, 6), "mask": labels[i]} for i in range(2)]
    # the probe predicts class 1 everywhere: pooled class-1 Dice 2 * 12 / (48 + 12) = 0.4;
    # background and the absent class 2 are not averaged in
    assert m.validate(Probe(constant=1), items, args, torch.device("cpu")) == pytest.approx(0.4)


def test_validation_recon_score_is_eq3_per_sample_mean():
    class Zero(torch.nn.Module):  # recon net stand-in: x = 0 on K = 3 channels
        def forward(self, labels):
            return m.UNetOutput(torch.zeros(labels.shape[0], 3, *labels.shape[1:]), None, [], [])
    args = make_args(batch_size=2)
    args.num_classes = 3
    items = [{"image": torch.full((3, 4, 6), v), "mask": torch.zeros(4, 6, dtype=torch.long)}
             for v in (0.5, 1.0, 0.0)]  # batches of 2 and 1: a mean per sample, not per batch
    # x_hat = the slice on every channel: 0.6 * 0.25 + 0.4 * 0.5 = 0.35, 0.6 + 0.4 = 1, and 0
    score = m.validate(Zero(), items, args, torch.device("cpu"), stage="recon")
    assert score == pytest.approx((0.35 + 1.0 + 0.0) / 3)


def test_bad_toy_sizes_stop_with_one_line():
    for sizes in ("8,0,3", "8,4", "a,b,c"):
        with pytest.raises(common.UserError, match=f"--toy-sizes {sizes}: give three"):
            make_args(toy_sizes=sizes)


def write_npz_layout(root, rare_id=11):
    """An ACDC-like (MT-UNet) layout in a folder without a data-set name; one rare class."""
    for split, n in (("train", 6), ("valid", 2), ("test", 2)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            image, label = common.make_toy_multiclass(i + 10 * len(split), 32)
            if split == "test" and i == 1:
                label[:4, :4] = rare_id  # only one test map holds it
                image, label = image[None].repeat(2, 0), label[None].repeat(2, 0)
            np.savez(root / split / f"case{i}.npz", img=image, label=label)
    return root


def test_unnamed_data_counts_classes_in_every_label_map(tmp_path):
    root = write_npz_layout(tmp_path / "mydata")
    args = make_args(data=str(root))
    data = common.load_data(args, "multiclass", augment=m.transunet_augment,
                            toy_sizes=(1, 1, 1), resize="cubic")
    k, names, note = m.resolve_classes(args, data)
    assert k == 12 and len(names) == 11 and "every label map" in note
    args.dataset = "acdc"  # named: the paper's 4 classes
    assert m.resolve_classes(args, data)[0] == 4


def test_png_pairs_give_every_case_and_their_class_count(tmp_path):
    pairs = []
    for i in range(2):  # two RGB images with different label maps (ids up to 3 + i)
        labels = np.zeros((6, 10), np.int64)
        labels[i:i + 2, 2 + i:6] = 3 + i
        common.save_label_png(tmp_path / f"m{i}.png", labels)
        image = np.random.default_rng(i).integers(0, 255, (6, 10, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / f"i{i}.png")
        pairs.append({"key": f"i{i}", "image": tmp_path / f"i{i}.png",
                      "masks": [tmp_path / f"m{i}.png"], "context": None})
    dataset = common.PairDataset(pairs, 16, labels=True)
    cases = list(m.test_cases(dataset))
    assert [name for _, _, name in cases] == ["i0", "i1"]
    assert [int(lab.max()) for _, lab, _ in cases] == [3, 4] and cases[1][0].shape == (6, 10, 3)
    args = make_args(data=str(tmp_path))
    k, names, _ = m.resolve_classes(args, {"train": dataset, "val": None, "test": {"t": dataset}})
    assert k == 5 and names[-1] == "class4"


# ---- the command line: the two stages wired ----

def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    loaded = []
    with pytest.MonkeyPatch.context() as patch:
        original = m.load_recon_net
        patch.setattr(m, "load_recon_net", lambda args, path, *a: (
            loaded.append(Path(path)), original(args, path, *a))[1])
        m.main(TINY + ["--epochs", "1", "--recon-epochs", "1", "--out", str(out)])
    (out / "loaded.txt").write_text("\n".join(map(str, loaded)))
    return out


def test_cli_run_writes_every_file_and_stage2_loads_recon_last(run_dir):
    for name in ("config.json", "log.csv", "recon_last.pt", "recon_best.pt", "last.pt",
                 "best.pt", "test_metrics.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "loaded.txt").read_text() == str(run_dir / "recon_last.pt")  # spec 2.4
    assert len(list((run_dir / "predictions").glob("*.png"))) >= 3
    metrics = json.loads((run_dir / "test_metrics.json").read_text())["toy"]
    assert {"mean_dice", "mean_hd95", "dice_vessel", "hd95_pouch"} <= set(metrics)
    assert [(r["stage"], r["epoch"]) for r in read_log(run_dir / "log.csv")] == [
        ("recon", "0"), ("seg", "0")]
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["recon_target"], config["mid_feature"], config["recon_bn"]) == (
        "image", "bottleneck", "batch")
    stages = {torch.load(run_dir / f, weights_only=True)["stage"] for f in
              ("recon_last.pt", "recon_best.pt")}
    assert stages == {"recon"} and torch.load(run_dir / "best.pt")["stage"] == "seg"


def test_startup_prints_the_protocol_row_and_both_epoch_counts(tmp_path, capsys):
    m.main(TINY + ["--epochs", "1", "--recon-epochs", "2", "--limit-batches", "1",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "protocol [toy] Built-in" in out
    assert "stage 1: 2 epochs (--recon-epochs)" in out and "stage 2: 1 epochs (--epochs)" in out
    assert "Tab. 1" in m.protocol_row("synapse") and "Tab. 2" in m.protocol_row("acdc")


def test_each_stage_keeps_its_own_best_epoch(tmp_path, monkeypatch):
    scores = {"recon": iter([0.9, 0.8]), "seg": iter([0.6, 0.5])}  # stage 1 lower is better
    monkeypatch.setattr(m, "validate", lambda model, data, args, device, stage: next(scores[stage]))
    m.main(TINY + ["--epochs", "2", "--recon-epochs", "2", "--limit-batches", "1",
                   "--out", str(tmp_path)])
    epoch = {f: torch.load(tmp_path / f"{f}.pt", weights_only=True)["epoch"]
             for f in ("recon_best", "recon_last", "best", "last")}
    assert epoch == {"recon_best": 1, "recon_last": 1, "best": 0, "last": 1}


def test_eval_reproduces_test_metrics(run_dir, tmp_path):
    metrics = m.main(["--eval", str(run_dir / "best.pt"), "--out", str(tmp_path)])
    saved = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["toy"] == pytest.approx(saved["toy"], nan_ok=True)  # nan: organ never seen


def test_eval_of_a_checkpoint_without_a_class_count_counts_them(run_dir, tmp_path):
    state = common.load_checkpoint(run_dir / "best.pt", m.SCRIPT)
    for key in ("num_classes", "class_names"):
        del state["config"][key]
    common.save_checkpoint(tmp_path / "old.pt", state)
    metrics = m.main(["--eval", str(tmp_path / "old.pt"), "--out", str(tmp_path / "o")])
    assert "dice_vessel" in metrics["toy"]  # the toy names: 8 organs, K = 9


@pytest.mark.parametrize("flags,message", [
    (["--stage", "seg", "--recon-ckpt", "{run}/best.pt"], "its stage is 'seg', expected 'recon'"),
    (["--stage", "seg", "--recon-ckpt", "{run}/last.pt"], "its stage is 'seg'"),
    (["--eval", "{run}/recon_last.pt"], "its stage is 'recon', expected 'seg'"),
    (["--stage", "seg", "--recon-ckpt", "{run}/recon_last.pt", "--preset", "small"], "preset"),
    (["--stage", "seg", "--recon-ckpt", "{run}/recon_last.pt", "--dataset", "acdc"],
     "--num-classes 4 differs from the checkpoint's 9"),
    (["--stage", "seg", "--recon-ckpt", "{tmp}/model.pth"], "not a state_dict"),
    (["--stage", "seg", "--recon-ckpt", "{tmp}/list.pth"], "not a state_dict"),
    (["--pretrained", "{tmp}/model.pth", "--lam", "0"], "--pretrained"),
    (["--eval", "{run}/best.pt", "--preset", "small"], "--preset small differs"),
])
def test_wrong_checkpoint_or_weights_file_stops_with_one_line(run_dir, tmp_path, flags, message):
    torch.save(m.build_model("tiny", 9), tmp_path / "model.pth")  # a pickled full model
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    flags = [f.replace("{run}", str(run_dir)).replace("{tmp}", str(tmp_path)) for f in flags]
    with pytest.raises(common.UserError, match=re.escape(message)) as error:
        m.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "o")] + flags)
    assert "\n" not in str(error.value)


def test_stage_seg_with_authors_recon_weights_and_switches(run_dir, tmp_path):
    state = torch.load(run_dir / "recon_last.pt", weights_only=False)["model"]
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "epoch_149.pth")
    out = tmp_path / "seg"
    m.main(TINY + ["--stage", "seg", "--recon-ckpt", str(tmp_path / "epoch_149.pth"),
                   "--epochs", "1", "--as-released", "--align-groups", "e2d,mid",
                   "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert (config["recon_target"], config["mid_feature"], config["recon_bn"]) == (
        "image", "up1", "batch")
    assert float(read_log(out / "log.csv")[0]["train_align"]) > 0
    assert not (out / "recon_last.pt").exists()


def test_resume_continues_each_stage_with_the_folders_own_frozen_net(run_dir, tmp_path,
                                                                     monkeypatch):
    import shutil
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    loaded, original = [], m.load_recon_net
    monkeypatch.setattr(m, "load_recon_net", lambda args, path, *a: (
        loaded.append(Path(path)), original(args, path, *a))[1])
    m.main(["--resume", str(folder / "last.pt"), "--epochs", "3"])  # stage 2 at epoch 1
    assert loaded == [folder / "recon_last.pt"]  # not the path of the original run
    rows = read_log(folder / "log.csv")
    assert [(r["stage"], r["epoch"]) for r in rows] == [("recon", "0"), ("seg", "0"),
                                                        ("seg", "1"), ("seg", "2")]
    per_epoch = 2  # 8 training slices, batch 4
    assert float(rows[2]["lr"]) == pytest.approx(m.poly_lr(0.05, per_epoch, 3 * per_epoch),
                                                 rel=1e-5)  # the new total, from epoch 1 on
    assert torch.load(folder / "last.pt", weights_only=False)["epoch"] == 2
    again = tmp_path / "again"
    shutil.copytree(run_dir, again)
    m.main(["--resume", str(again / "recon_last.pt"), "--recon-epochs", "2"])  # stage 1 at 1
    rows = [(r["stage"], r["epoch"]) for r in read_log(again / "log.csv")]
    assert rows == [("recon", "0"), ("seg", "0"), ("recon", "1"), ("seg", "0")]
    assert loaded[-1] == again / "recon_last.pt"


def test_stage1_resumed_into_a_new_folder_keeps_its_own_best(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(m, "validate", lambda *a: 99.0)  # never better than the old best
    out = tmp_path / "new"
    m.main(["--resume", str(run_dir / "recon_last.pt"), "--stage", "recon", "--recon-epochs", "2",
            "--limit-batches", "1", "--out", str(out)])
    assert sorted(p.name for p in out.glob("*.pt")) == ["recon_best.pt", "recon_last.pt"]
    assert torch.load(out / "recon_best.pt", weights_only=True)["epoch"] == 0  # the old run's


def test_compare_pairs_the_baseline_and_prints_the_delta(tmp_path, monkeypatch, capsys):
    seen, original = [], m.train_one_epoch

    def spy(model, loader, optimizer, device, args, stage, *rest, **kwargs):
        if stage == "seg":  # stage 2: record its weights and every batch it sees
            recorder = list(loader)  # the one iteration the epoch would do
            seen.append(([v.clone() for v in model.state_dict().values()],
                         [(b["index"].tolist(), float(b["image"].sum())) for b in recorder]))
            loader = recorder
        return original(model, loader, optimizer, device, args, stage, *rest, **kwargs)
    monkeypatch.setattr(m, "train_one_epoch", spy)
    result = m.main(TINY + ["--compare", "--epochs", "2", "--recon-epochs", "1",
                            "--augment", "on", "--out", str(tmp_path)])
    reseg, plain = seen[:2], seen[2:]
    assert len(reseg) == len(plain) == 2
    assert all(torch.equal(a, b) for a, b in zip(reseg[0][0], plain[0][0]))  # same init
    assert [r[1] for r in reseg] == [p[1] for p in plain]  # same order and augmentation
    assert reseg[0][1] != reseg[1][1]  # a new order each epoch
    assert float(read_log(tmp_path / "baseline" / "log.csv")[0]["train_align"]) == 0
    assert not (tmp_path / "baseline" / "recon_last.pt").exists()
    delta = result["delta"]["toy"]["mean_dice"]
    assert delta == pytest.approx(result["reseg"]["toy"]["mean_dice"]
                                  - result["baseline"]["toy"]["mean_dice"])
    out = capsys.readouterr().out
    assert re.search(r"compare \[toy\]: mean_dice +[-\d.]+ +[-\d.]+ +" + f"{100 * delta:.2f}", out)


def test_predict_writes_one_png_per_image(run_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        image, _ = common.make_toy_multiclass(i, 40)
        common.save_mask_png(images / f"im{i}.png", image > 0.5)
    out = tmp_path / "out"
    m.main(["--predict", str(images), "--checkpoint", str(run_dir / "best.pt"),
            "--out", str(out)])
    written = sorted(p.name for p in (out / "predictions").glob("*.png"))
    assert written == ["im0.png", "im1.png", "im2.png"]
    assert common.load_label_map(out / "predictions" / "im0.png").shape == (40, 40)


def test_predict_follows_the_resize_setting(run_dir, tmp_path, monkeypatch):
    seen, original = [], common.predict_volume
    monkeypatch.setattr(common, "predict_volume", lambda *a, **k: (
        seen.append(k.get("resize")), original(*a, **k))[1])
    images = tmp_path / "images"
    images.mkdir()
    common.save_mask_png(images / "im0.png", common.make_toy_multiclass(0, 40)[0] > 0.5)
    for resize in ("bilinear", "cubic"):
        m.main(["--predict", str(images), "--checkpoint", str(run_dir / "best.pt"),
                "--resize", resize, "--out", str(tmp_path / resize)])
    assert seen == ["bilinear", "cubic"]


def test_unnamed_folder_trains_with_the_counted_classes(tmp_path):
    root = write_npz_layout(tmp_path / "mydata")
    metrics = m.main(["--data", str(root), "--preset", "tiny", "--img-size", "32",
                      "--batch-size", "4", "--epochs", "1", "--recon-epochs", "1",
                      "--out", str(tmp_path / "o")])
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_classes"] == 12
    assert "dice_class11" in metrics["test"]


def test_bench_prints_one_record(tmp_path):
    record = m.main(["--bench", "--preset", "tiny", "--img-size", "32", "--batch-size", "2",
                     "--out", str(tmp_path)])
    assert record["params_M"] == pytest.approx(0.122, abs=1e-3)
    assert record["train_images_per_s"] > 0 and record["inference_images_per_s"] > 0


@pytest.mark.parametrize("flags,culprit", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--eval", "{bad}"], "bad.pt"),
    (["--stage", "seg"], "--recon-ckpt"),
])
def test_bad_input_exits_with_one_line(tmp_path, flags, culprit):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    flags = [f.replace("{bad}", str(bad)) for f in flags]
    result = subprocess.run([sys.executable, str(ROOT / "reseg_unet.py"), *TINY,
                             "--epochs", "1", "--out", str(tmp_path / "o"), *flags],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0]
