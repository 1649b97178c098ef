"""cProfile of one model's analyze + merge, as passes_speed runs it (1x3x224x224, 2 threads).

    python benchmarks/profile_passes.py fcn_resnet50 drop_all      # or keep_all; timm:NAME for timm

Prints the CPU seconds of analyze and merge and the top functions by cumulative and own time.
"""
import sys, cProfile, pstats, io, time, warnings, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
warnings.simplefilter("ignore")
torch.set_num_threads(2)
import passes_speed as ps, fxmerge
name, job = sys.argv[1], sys.argv[2]
m = ps.build(name); x = torch.randn(1, 3, 224, 224)
with torch.no_grad(): m(torch.randn(1, 3, 64, 64))
pr = cProfile.Profile()
c0, w0 = time.process_time(), time.perf_counter()
pr.enable()
a = fxmerge.analyze(m, (x,)); c1 = time.process_time()
merged = fxmerge.merge(m, getattr(fxmerge.Plan, job)(a))
pr.disable()
print(f"{name} {job}: wall {time.perf_counter()-w0:.2f} s, cpu analyze {c1-c0:.2f} s, merge {time.process_time()-c1:.2f} s (profiled)")
for key, n in (("cumulative", 45), ("tottime", 25)):
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats(key).print_stats(n); print(s.getvalue())
