import time, torch
from models import create_model
from torch.profiler import profile, ProfilerActivity
m = create_model("baseline_gpt2", preset="rtx3080", vocab_size=50304).cuda()
opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
x = torch.randint(0, 50304, (32, 256), device="cuda"); y = torch.randint(0, 50304, (32, 256), device="cuda")
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m.training_loss(x, y)[0]
    loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(5): step()
torch.cuda.synchronize()
for label in ["full", "fwd only"]:
    t = time.perf_counter()
    for _ in range(10):
        if label == "full": step()
        else:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16): m(x)
    torch.cuda.synchronize(); print(label, (time.perf_counter() - t) / 10 * 1000, "ms")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    for _ in range(3): step()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12))
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
