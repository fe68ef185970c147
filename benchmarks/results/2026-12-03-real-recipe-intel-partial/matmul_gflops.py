import time, torch
torch.set_num_threads(2)
for n in (512, 1024, 2048):
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, dtype=dt); b = torch.randn(n, n, dtype=dt)
        for _ in range(3): a @ b
        reps = max(3, int(2e10 / (2 * n**3)))
        t = time.perf_counter()
        for _ in range(reps): a @ b
        dtm = time.perf_counter() - t
        print(n, dt, f"{2*n**3*reps/dtm/1e9:.0f} GFLOP/s")
# linear-like shape in a 135M model: tokens x 576 @ 576 x 1536
x = torch.randn(2048, 576); w = torch.randn(1536, 576)
for dt in (torch.float32, torch.bfloat16):
    xx, ww = x.to(dt), w.to(dt)
    for _ in range(3): torch.nn.functional.linear(xx, ww)
    t = time.perf_counter(); r = 50
    for _ in range(r): torch.nn.functional.linear(xx, ww)
    dtm = time.perf_counter() - t
    print("linear 2048x576x1536", dt, f"{2*2048*576*1536*r/dtm/1e9:.0f} GFLOP/s")
