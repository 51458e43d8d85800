"""What a compiled GPU kernel does, read from its PTX and its cubin (no GPU needed).

Used by ``benchmarks/kernel_report.py``; nothing here knows about dicetorch's kernels.

* :func:`analyze_ptx` parses the PTX of one ``.entry``: basic blocks, loops (a branch back to an
  earlier label closes a loop; the blocks between header and latch are its body, as LLVM and
  nvcc lay them out), and which kernel parameter every global load/store address derives from (a
  forward taint analysis from ``ld.param``).  The caller says which parameters are the logits, the
  gradient and the target (``roles``); per kernel it gets:

  - *passes*: a loop whose own blocks (not those of a nested loop) load logits, or the code outside
    every loop if that loads logits (and, in a kernel with a loop pass, computes exps: loads alone
    there prefetch the loop's first tile).  A pass reads each element once, so ``passes > 1`` means
    the logits are read (and their activation recomputed) more than once;
  - per pass and per iteration of one thread, along the heaviest path through the loop body (a
    branchy online softmax has an exp in each arm, but one arm runs): logits elements loaded, exps
    (``ex2.approx``), the narrowest logits load and gradient store in bits, and the barriers
    (``bar.sync``/``barrier.*``) anywhere inside the loop, nested loops included;
  - ``exps_per_elem`` = sum over passes of exps / elements (1.0: one exp per element and direction);
  - ``ld_bytes_per_iter``: bytes of all global loads (logits, labels, ...) one thread issues per
    iteration of the main pass, along its heaviest path.

* :func:`res_usage` reads registers, stack, local (spill) and static shared memory per function
  from ``cuobjdump -res-usage``; :func:`sass_counts` counts MUFU.EX2, BAR and LDG/STG widths in
  the SASS (a cross-check of the PTX figures after ptxas).
* :func:`occupancy` is the CUDA occupancy calculation (registers per warp in units of 256, four
  sub-partitions of 16K registers, shared memory per block plus the 1 KB the driver reserves,
  resident warp and block limits) with the per-architecture limits of the CUDA C++ Programming
  Guide's compute-capability table in :data:`ARCH_LIMITS`.

fp64 exps are inlined libdevice sequences with no single marker instruction, so they are not
counted (``exps`` is None for kernels without ``ex2``).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

# compute capability -> resident limits per SM (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"), and the SM count of a typical part (for grid sizing).
ARCH_LIMITS = {
    75: dict(max_warps=32, max_blocks=16, smem=64 * 1024, reserved=0, sms=40, part="T4"),
    80: dict(max_warps=64, max_blocks=32, smem=164 * 1024, reserved=1024, sms=108, part="A100"),
    86: dict(max_warps=48, max_blocks=16, smem=100 * 1024, reserved=1024, sms=84, part="RTX 3090 / A40"),
    89: dict(max_warps=48, max_blocks=24, smem=100 * 1024, reserved=1024, sms=142, part="L40S"),
    90: dict(max_warps=64, max_blocks=32, smem=228 * 1024, reserved=1024, sms=132, part="H100 SXM"),
    100: dict(max_warps=64, max_blocks=32, smem=228 * 1024, reserved=1024, sms=148, part="B200"),
    120: dict(max_warps=48, max_blocks=32, smem=100 * 1024, reserved=1024, sms=170, part="RTX 5090"),
}
REGS_PER_SM, SUB_PARTITIONS, REG_UNIT = 65536, 4, 256


def occupancy(arch: int, regs: int, smem: int, threads: int) -> dict:
    """Resident blocks and warps per SM of a kernel, and which resource limits them."""
    lim = ARCH_LIMITS[arch]
    wpb = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    warps_by_regs = SUB_PARTITIONS * ((REGS_PER_SM // SUB_PARTITIONS) // regs_per_warp)
    limits = {
        "warps": lim["max_warps"] // wpb,
        "blocks": lim["max_blocks"],
        "registers": warps_by_regs // wpb,
        "shared": lim["smem"] // (smem + lim["reserved"]) if smem else lim["max_blocks"],
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    return dict(blocks=blocks, warps=blocks * wpb, occupancy=blocks * wpb / lim["max_warps"], limiter=limiter)


# ----------------------------------------------------------------------------------------------
# PTX parsing
# ----------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)\s*\(", re.M)
_LABEL = re.compile(r"^(\$?[A-Za-z_$][\w$.]*):(?!:)")  # not "st.shared::cta"
_REG = re.compile(r"%[A-Za-z_][\w.]*")
_NO_DEST = ("st.", "red.", "bar", "barrier", "bra", "ret", "exit", "membar", "fence", "prefetch", "trap",
            "call", "cp.async", "griddepcontrol", "setmaxnreg")
_BARRIER = re.compile(r"^(bar|barrier)\b")
_EXP = re.compile(r"^ex2\.approx")
_GLOBAL_MEM = re.compile(r"^(ld|ldu|st)\.global\b")
_WIDTH = re.compile(r"\.(?:[bfus])(8|16|32|64|128)\b")
_VEC = re.compile(r"\.v(2|4|8)\b")


def split_entries(ptx: str) -> dict:
    """{entry name: PTX text of that entry (header and body)}."""
    out = {}
    starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(ptx)]
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(ptx)
        out[name] = ptx[pos:end]
    return out


def _split_operands(s: str) -> list:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


@dataclasses.dataclass
class Instr:
    op: str
    pred: str
    operands: list
    dests: list
    srcs: list
    addr: list  # registers inside [...]
    param: int | None = None  # ld.param: parameter index


def _parse_statement(stmt: str) -> Instr | None:
    stmt = stmt.strip()
    if not stmt or stmt.startswith(".") or stmt in ("{", "}"):
        return None
    pred = ""
    m = re.match(r"^@!?%[\w.]+\s+", stmt)
    if m:
        pred, stmt = m.group(0).strip(), stmt[m.end():]
    parts = stmt.split(None, 1)
    op = parts[0]
    operands = _split_operands(parts[1]) if len(parts) > 1 else []
    addr = [r for o in operands for inner in re.findall(r"\[([^\]]*)\]", o) for r in _REG.findall(inner)]
    if op.startswith(_NO_DEST) or not operands:
        dests, srcs = [], _REG.findall(" ".join(operands))
    else:
        dests, srcs = _REG.findall(operands[0]), _REG.findall(" ".join(operands[1:]))
    srcs += _REG.findall(pred)
    param = None
    if op.startswith("ld.param"):
        pm = re.search(r"_param_(\d+)", " ".join(operands))
        param = int(pm.group(1)) if pm else None
    return Instr(op, pred, operands, dests, srcs, addr, param)


def parse_blocks(entry_ptx: str):
    """Basic blocks of one entry: [(label or None, [Instr])]."""
    body = entry_ptx[entry_ptx.find("{", entry_ptx.find(")")):]
    blocks = [[None, []]]
    for raw in body.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        m = _LABEL.match(line)
        if m:
            blocks.append([m.group(1), []])
            line = line[m.end():].strip()
        for stmt in line.split(";"):
            ins = _parse_statement(stmt.strip().strip("{}").strip())
            if ins is None:
                continue
            blocks[-1][1].append(ins)
            if ins.op.startswith(("bra", "ret", "exit")):
                blocks.append([None, []])
    return [(lab, ins) for lab, ins in blocks if ins or lab]


def _taint(blocks) -> dict:
    """register -> set of parameter indices its value derives from (addresses, not loaded data)."""
    taint: dict = {}
    for _ in range(20):
        changed = False
        for _, instrs in blocks:
            for ins in instrs:
                if ins.param is not None:
                    new = {ins.param}
                elif ins.op.startswith(("ld.", "ldu.", "atom.", "shfl", "cp.")):
                    new = set()  # loaded data carries no address taint
                else:
                    new = set().union(*(taint.get(r, ()) for r in ins.srcs))
                for d in ins.dests:
                    old = taint.get(d, set())
                    if not new <= old:
                        taint[d] = old | new
                        changed = True
        if not changed:
            break
    return taint


def _mem_bits(op: str) -> int:
    w = _WIDTH.findall(op)
    v = _VEC.search(op)
    return int(w[-1]) * (int(v.group(1)) if v else 1) if w else 0


def analyze_ptx(entry_ptx: str, roles: dict, elem_bits: int) -> dict:
    """Loop and memory statistics of one PTX entry (see the module docstring).

    Args:
        roles: {parameter index: "logits" | "grad" | "target" | ...}
        elem_bits: bits of one logits element (16, 32, 64)
    """
    blocks = parse_blocks(entry_ptx)
    taint = _taint(blocks)
    label_at = {lab: i for i, (lab, _) in enumerate(blocks) if lab}
    n = len(blocks)
    stats = []  # per block
    mem = []  # (block, role, "ld"/"st", bits)
    for b, (_, instrs) in enumerate(blocks):
        s = dict(exps=0, barriers=0, logits=0, grad=0, ld_bytes=0)
        for ins in instrs:
            if _EXP.match(ins.op):
                s["exps"] += 1
            elif _BARRIER.match(ins.op):
                s["barriers"] += 1
            elif _GLOBAL_MEM.match(ins.op):
                params = set().union(*(taint.get(r, ()) for r in ins.addr)) if ins.addr else set()
                kind = "st" if ins.op.startswith("st") else "ld"
                bits = _mem_bits(ins.op)
                if kind == "ld":
                    s["ld_bytes"] += bits // 8
                for role in sorted({roles[p] for p in params if p in roles}) or ["other"]:
                    mem.append((b, role, kind, bits))
                    if role == "logits" and kind == "ld":
                        s["logits"] += bits / elem_bits
                    if role == "grad" and kind == "st":
                        s["grad"] += bits / elem_bits
        stats.append(s)

    # control flow: successors, dominators, natural loops (a back edge b -> h with h dominating b)
    succ = []
    for b, (_, instrs) in enumerate(blocks):
        out = []
        last = instrs[-1] if instrs else None
        if last is not None and last.op.startswith("bra"):
            tgt = label_at.get(last.operands[0].strip()) if last.operands else None
            if tgt is not None:
                out.append(tgt)
            if last.pred and b + 1 < n:
                out.append(b + 1)
        elif last is not None and last.op.startswith(("ret", "exit")) and not last.pred:
            pass
        elif b + 1 < n:
            out.append(b + 1)
        succ.append(out)
    pred = [[] for _ in range(n)]
    for b, out in enumerate(succ):
        for t in out:
            pred[t].append(b)
    everything = frozenset(range(n))
    reachable, work = {0}, [0]
    while work:  # unreachable blocks (empty ones after an unconditional branch) must not cut dominators
        for t in succ[work.pop()]:
            if t not in reachable:
                reachable.add(t)
                work.append(t)
    dom = [frozenset([0])] + [everything] * (n - 1)
    changed = True
    while changed:
        changed = False
        for b in range(1, n):
            ps = [dom[p] for p in pred[b] if p in reachable]
            new = frozenset([b]) | (frozenset.intersection(*ps) if ps else frozenset())
            if new != dom[b]:
                dom[b], changed = new, True
    back = {(b, h) for b in range(n) for h in succ[b] if h in dom[b]}
    bodies: dict = {}
    for b, h in back:
        body, work = {h, b}, [b]
        while work:
            x = work.pop()
            if x == h:
                continue
            for p in pred[x]:
                if p not in body:
                    body.add(p)
                    work.append(p)
        bodies[h] = bodies.get(h, set()) | body
    header_of = {frozenset(v): h for h, v in bodies.items()}
    loops = sorted(header_of, key=len)
    owner = [next((L for L in loops if b in L), None) for b in range(n)]  # innermost loop

    def longest(region, key):
        """Heaviest path (sum of ``key`` over the region's own blocks) through one iteration."""
        nodes = region if region is not None else everything
        start = header_of[region] if region is not None else 0
        order, seen, stack = [], {start}, [(start, iter(succ[start]))]
        while stack:  # post-order over forward edges inside the region
            x, it = stack[-1]
            t = next(it, None)
            if t is None:
                stack.pop()
                order.append(x)
            elif t in nodes and t not in seen and (x, t) not in back:
                seen.add(t)
                stack.append((t, iter(succ[t])))
        dist = {start: stats[start][key] if owner[start] == region else 0}
        for x in reversed(order):
            if x not in dist:
                continue
            for t in succ[x]:
                if t in nodes and (x, t) not in back:
                    w = stats[t][key] if owner[t] == region else 0
                    if dist.get(t, -1) < dist[x] + w:
                        dist[t] = dist[x] + w
        return max(dist.values())

    passes = []
    for region in [None] + loops:
        direct = [b for b in range(n) if owner[b] == region]
        if not any(stats[b]["logits"] for b in direct):
            continue
        nodes = region if region is not None else everything
        widths = [bits for (b, role, kind, bits) in mem if b in direct and role == "logits" and kind == "ld"]
        gwidths = [bits for (b, role, kind, bits) in mem if b in direct and role == "grad" and kind == "st"]
        passes.append(dict(
            loop=region is not None, blocks=nodes, elems=longest(region, "logits"), exps=longest(region, "exps"),
            ld_bytes=longest(region, "ld_bytes"),
            barriers=sum(stats[b]["barriers"] for b in nodes),
            ld_bits=min(widths) if widths else None, st_bits=min(gwidths) if gwidths else None,
            nested_in_pass=False,
        ))
    if any(p["loop"] for p in passes):
        # straight-line logits loads that compute nothing are a prefetch of the loop's first tile
        passes = [p for p in passes if p["loop"] or p["exps"]]
    regions = loops
    loop_passes = [p for p in passes if p["loop"]]
    for p in loop_passes:  # a pass inside the loop of another pass re-reads per outer iteration
        p["nested_in_pass"] = any(q is not p and p["blocks"] < q["blocks"] for q in loop_passes)
    for p in passes:
        p["blocks"] = len(p["blocks"])
    main = max(passes, key=lambda p: p["elems"]) if passes else None
    total_exps = sum(s["exps"] for s in stats)
    by_role: dict = {}
    for (_, role, kind, bits) in mem:
        by_role.setdefault(f"{kind}:{role}", set()).add(bits)
    tile_barriers = max((p["barriers"] for p in loop_passes), default=None)
    if tile_barriers is None:
        tile_barriers = sum(s["barriers"] for s in stats)
    return dict(
        loops=len(regions), passes=len(passes), nested_passes=sum(p["nested_in_pass"] for p in passes),
        pass_detail=passes,
        elems_per_iter=main["elems"] if main else 0,
        ld_bytes_per_iter=main["ld_bytes"] if main else 0,
        exps_per_iter=main["exps"] if main else 0,
        exps_per_elem=(sum(p["exps"] / p["elems"] for p in passes if p["elems"]) if total_exps else None),
        logits_ld_bits=main["ld_bits"] if main else None,
        grad_st_bits=min((p["st_bits"] for p in passes if p["st_bits"]), default=None),
        barriers_in_loop=tile_barriers,
        barriers_total=sum(s["barriers"] for s in stats),
        exps_total=total_exps,
        mem_widths={k: sorted(v) for k, v in sorted(by_role.items())},
    )


def threads_per_block(entry_ptx: str) -> int | None:
    m = re.search(r"\.(?:reqntid|maxntid)\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", entry_ptx)
    if not m:
        return None
    return int(m.group(1)) * int(m.group(2) or 1) * int(m.group(3) or 1)


# ----------------------------------------------------------------------------------------------
# cubin tools
# ----------------------------------------------------------------------------------------------
def find_tool(name: str) -> str | None:
    """cuobjdump/nvdisasm: Triton's bundled copy, then CUDA_HOME, then PATH."""
    cands = []
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    cands += [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name), shutil.which(name) or ""]
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def _cubin_tool(cubin: bytes, args: list) -> str:
    tool = find_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (Triton's NVIDIA backend or CUDA_HOME/bin)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *args, f.name], capture_output=True, text=True, check=True).stdout


def res_usage(cubin: bytes) -> dict:
    """{function name: {"regs", "stack", "shared_static", "local"}} from ``cuobjdump -res-usage``."""
    out, cur = {}, None
    for line in _cubin_tool(cubin, ["-res-usage"]).splitlines():
        m = re.match(r"\s*Function ([^:\s]+):", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and cur:
            out[cur] = dict(zip(("regs", "stack", "shared_static", "local"), map(int, m.groups())))
            cur = None
    return out


def sass_counts(cubin: bytes) -> dict:
    """{function: {"MUFU.EX2", "BAR", "LDG.<bits>", "STG.<bits>"}} from ``cuobjdump -sass``."""
    out, cur = {}, None
    for line in _cubin_tool(cubin, ["-sass"]).splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(r"\b(MUFU\.EX2|BAR\.\w+|LDG\.[\w.]+|STG\.[\w.]+)", line)
        if not m:
            continue
        ins = m.group(1)
        if ins.startswith("BAR"):
            key = "BAR"
        elif ins.startswith(("LDG", "STG")):
            w = re.search(r"\.[US]?(8|16|64|128)\b", ins)
            key = ins[:3] + "." + (w.group(1) if w else "32")
        else:
            key = ins
        cur[key] = cur.get(key, 0) + 1
    return out
