"""CoLA side by side: the released code (Cascol-Chen/COLA 72f0e40, .cuda() made a no-op) against cemabench's port,
float64, a tiny random timm ViT, made-up batches of 64. Prints the largest difference per quantity.

Set-up: a checkout of the released code at that commit (for example ``git -C MIRROR archive 72f0e40 | tar -x -C DIR``),
then ``COLA_SRC=DIR python benchmarks/cola_side_by_side.py`` (about a minute on one CPU core; ``WM=0.000001`` makes
Eq. (8)'s log branch fire)."""
import copy
import logging
import math
import os
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.environ.get("COLA_SRC", os.path.join(os.path.dirname(__file__), "cola")))
torch.set_default_dtype(torch.float64)
torch.Tensor.cuda = lambda self, *a, **k: self  # the only patch: .cuda() stays on the CPU
nn.Module.cuda = lambda self, *a, **k: self

import tta_library.eata as eata  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from tta_library.cola import CoLAOptimizer, CoLAViT  # noqa: E402

from cemabench.method import CloudResources, Upload  # noqa: E402
from cemabench_methods.cola import CoLA, _CoLACloud, _FollowerEdge  # noqa: E402

C, AGENTS, GROUP, GROUPS = 10, 3, 4, 3  # classes, principals, batches per domain-group, groups
E_FRACTION, D_MARGIN = 0.8, 0.5
WM = float(os.environ.get("WM", "0.01"))  # the weight margin w_m of Eq. (8)
logger = logging.getLogger("cola")
diff = {}


def note(name, a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    d = (a - b).abs().max().item() if a.numel() else 0.0
    diff[name] = max(diff.get(name, 0.0), d)


torch.manual_seed(0)
net = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=C)
with torch.no_grad():
    net.head.weight.mul_(30)
    for m in net.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.add_(0.1 * torch.randn_like(m.weight))
            m.bias.add_(0.1 * torch.randn_like(m.bias))
net.eval()

g = torch.Generator().manual_seed(1)
domains = [(0.2 * k, 1 + 0.5 * k) for k in range(5)]  # (shift, scale) of each made-up domain
# each agent sees a group of domains between exchanges, as the released Community (several batches per domain)
plan = [[[domains[(a + grp) % 5], domains[(a + grp + 2) % 5]] for grp in range(GROUPS)] for a in range(AGENTS)]
batches = [[[torch.randn(64, 3, 32, 32, generator=g) * s + m for (m, s) in group for _ in range(GROUP // 2)]
            for group in plan[a]] for a in range(AGENTS)]
margin = E_FRACTION * math.log(C)

# ---------------------------------------------------------------- released
root = tempfile.mkdtemp()
torch.save({"model": net.state_dict()}, os.path.join(root, "original.pth"))
files = []
_save_file = CoLAViT.save_file


def save_file(self):
    files.append(self.save_root + f"agent{self.agent_id + 1}_{self.corruption}_{self.count}.pth")
    _save_file(self)


CoLAViT.save_file = save_file
torch.manual_seed(5)
agents = []
for a in range(AGENTS):
    m = CoLAViT(copy.deepcopy(net), WM, logger=logger)
    m = eata.configure_model(m)
    m.load_weights_from_files(root, ["original.pth"])
    p = m.collect_params()
    alpha_opt = torch.optim.AdamW([{"params": p["alpha"], "lr": 0.1, "weight_decay": 0.1},
                                   {"params": p["alpha_scale"], "lr": 0.1}])
    eps_opt = torch.optim.SGD(p["epsilon_weight"] + p["epsilon_bias"], 0.001, momentum=0.9, weight_decay=0.)
    opt = CoLAOptimizer(1, alpha_opt, eps_opt)
    m.cola_optimizer = opt
    m.agent_id, m.save_root, m.save_vectors_to_file_on, m.corruption = a, root + "/", True, "x"
    agents.append(eata.EATA(m, opt, e_margin=margin, d_margin=D_MARGIN))

# ---------------------------------------------------------------- port
method = CoLA(weight_margin=WM, principals=AGENTS, exchange_every=GROUP, entropy_margin=E_FRACTION,
              redundancy_margin=D_MARGIN)
resources = CloudResources(num_classes=C, edge_replica=lambda: copy.deepcopy(net), foundation=None,
                           clean_images=None)
torch.manual_seed(5)
cloud = _CoLACloud(resources, method.options, AGENTS, margin)

# ---------------------------------------------------------------- run: the released order (agent after agent within
# a group, then the exchange); the port in lockstep (its exchange after every agent took the group's last batch)
shifts_released, shifts_port = [], []
for grp in range(GROUPS):
    outs = {}
    for a in range(AGENTS):
        for t, x in enumerate(batches[a][grp]):
            before = agents[a].model.weight_nums
            agents[a].model.corruption = f"g{grp}b{t}"
            agents[a].model.count = 1
            outs[(a, t)] = (agents[a](x).detach(), agents[a].model.weight_nums - before)
    rng = torch.get_rng_state()  # each side draws its exchange's random alphas from the same state
    for t in range(GROUP):
        for a in range(AGENTS):
            x = batches[a][grp][t]
            before = cloud.replicas[a].count
            cloud.step(Upload(samples=x, tensors={}, batch_index=grp * GROUP + t, index=torch.arange(64), device=a))
            r = cloud.replicas[a]
            note("outputs (logits)", outs[(a, t)][0], r.logits)
            shifts_released.append(outs[(a, t)][1])
            shifts_port.append(r.count - before if not (t == GROUP - 1 and a == AGENTS - 1) else None)
    torch.set_rng_state(rng)
    if True:
        community_knowledge = [ag.model.get_weights_for_share() for ag in agents]
        for i in range(AGENTS):
            others = [w for j in range(AGENTS) if j != i for w in community_knowledge[j]]
            agents[i].model.add_weights(others)
    for a in range(AGENTS):
        m, r = agents[a].model, cloud.replicas[a]
        note("vectors in the bank", m.weight_nums, r.count)
        note("share index", m.share_idx, r.share_from)
        note("alpha", m.alpha.detach(), r.fusion.alpha.detach())
        note("alpha_scale", m.alpha_scale.detach(), r.fusion.alpha_scale.detach())
        for fm, (_, pm) in zip(m.fuse_modules, r.layers):
            note("epsilon", torch.cat([fm.epsilon_weight, fm.epsilon_bias]).detach(),
                 torch.cat([pm.epsilon_weight, pm.epsilon_bias]).detach())
            note("bank vectors", torch.cat([fm.weights, fm.biases]), torch.cat([pm.weights, pm.biases]))
            note("fused weights and biases", torch.cat(fm.get_fused_weights_and_biases()).detach(),
                 torch.cat(pm.fused()).detach())
        for (vr, mr), (vp, mp) in zip(m.domain_infos, r.domain_infos):
            if vr is None or vp is None:
                assert vr is None and vp is None
                continue
            note("domain statistics", torch.cat([vr, mr]), torch.cat([vp, mp]))
        assert len(m.domain_infos) == len(r.domain_infos)
# the port's last exchange of each group happens inside the last agent's call; its shift count for that call is the
# exchange's too, so it is left out above
print("shift-triggered saves per batch, released:", sum(shifts_released), "of", len(shifts_released), "batches")
same = [s for s, p in zip(shifts_released, shifts_port) if p is not None and s != p]
print("batches whose save decision differs:", len(same))

# ---------------------------------------------------------------- saved vectors = the followers' pool
pool = cloud.pool
saved = [torch.load(f) for f in files]
print("vectors saved: released", len(saved), "port", len(pool))
assert len(saved) == len(pool)
for sd, (layers, var, mean) in zip(saved, pool):
    note("saved vectors", sd["model"], torch.stack([torch.stack(lb) for lb in layers]))
    note("saved vectors' statistics", torch.cat([sd["domain_var"], sd["domain_mean"]]), torch.cat([var, mean]))

# ---------------------------------------------------------------- fp followers
torch.manual_seed(7)
fp = CoLAViT(copy.deepcopy(net), fp_agent_mode_on=True, fp_temperature=5, logger=logger)
fp = eata.configure_model(fp)
fp.load_weights_from_files("/", files)
edge = _FollowerEdge(5.0)
model = edge.configure(copy.deepcopy(net))
down = cloud.step(Upload(samples=torch.zeros(0, 3, 32, 32), tensors={}, batch_index=0, device=AGENTS))
torch.manual_seed(7)
with torch.no_grad():
    edge.receive(model, down)
note("follower alpha", fp.alpha.detach(), edge.state.alpha)
fp_batches = [torch.randn(64, 3, 32, 32, generator=g) * s + m for (m, s) in domains for _ in range(2)]
with torch.inference_mode():
    for x in fp_batches:
        out = fp(x)
        decision = edge.step(model, x)
        note("follower outputs (logits)", out, decision.logits)
        note("follower alpha", fp.alpha.detach().to(torch.float64), edge.state.alpha)
        for fm, (_, pm) in zip(fp.fuse_modules, edge.layers):
            note("follower fused weights and biases", torch.cat(fm.get_fused_weights_and_biases()),
                 torch.cat(pm.fused()))
factors = [ag.model.estimate_scale_factor() for ag in agents]
print("scale factors now:", [round(f, 3) for f in factors], "alpha:",
      [a.model.alpha.detach().numpy().round(2) for a in agents])
print("follower vectors:", fp.weight_nums, len(edge.state.means))
for k, v in diff.items():
    print(f"{k:40s} {v:.3e}")
