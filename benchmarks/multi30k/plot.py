"""BLEU against decoding speed, one point per method and decode."""


MISSING = ("matplotlib is not installed (pip install 'fairseq-imitkd[bench]'): the results are written without "
           "the BLEU-against-speed plot")


def available() -> bool:
    """Whether matplotlib can be imported: without it the benchmark still writes its results, unplotted."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(res: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ts = res["teacher_speed"]
    if ts.get("beam5_b64") and res["teacher_bleu_beam5"] is not None:
        ax.scatter([ts["beam5_b64"]], [res["teacher_bleu_beam5"]], marker="*", s=220, color="black",
                   label="teacher, beam 5")
        ax.scatter([ts["greedy_b64"]], [res["teacher_bleu_greedy"]], marker="*", s=220, color="grey",
                   label="teacher, greedy")
    cmap = plt.get_cmap("tab10")
    for i, (m, r) in enumerate(res["methods"].items()):
        if r["student_sents_per_sec"] is None:
            continue
        ax.scatter([r["student_sents_per_sec"]], [r["bleu_greedy"]], color=cmap(i % 10), marker="o", label=m)
        if r["student_sents_per_sec_beam5"]:
            ax.scatter([r["student_sents_per_sec_beam5"]], [r["bleu_beam5"]], color=cmap(i % 10), marker="^",
                       alpha=0.6)
    # the deployed students: CTranslate2 int8, greedy, batch 64 (one seed each, another run's timer); only the
    # first run, whose machine timed the ● points: later runs (ct2_speed_*.json) may have timed on another
    ct2 = (res.get("ctranslate2_speed") or [None])[0]
    if ct2:
        colors = {m: cmap(i % 10) for i, m in enumerate(res["methods"])}
        first = True
        for r in ct2["rows"]:
            if r["engine"] != "ctranslate2" or r["weights"] != "int8" or r["batch_size"] != 64 or r.get("lever"):
                continue
            if r["model"] == "teacher":
                ax.scatter([r["sents_per_sec"]], [r["bleu"]], marker="P", s=160, color="black",
                           label="teacher, CTranslate2 int8 beam 5")
            else:
                ax.scatter([r["sents_per_sec"]], [r["bleu"]], marker="s", facecolors="none",
                           edgecolors=colors.get(r["model"], "grey"),
                           label="students, CTranslate2 int8 greedy, uncapped (□)" if first else None)
                first = False
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("test sentences/s (batch 64, CPU, 1 thread)" if res["setup"]["device"] == "cpu"
                  else "test sentences/s (batch 64, GPU)")
    ax.set_ylabel("test BLEU (sacreBLEU, detokenized)")
    ax.set_title(f"Multi30k De→En, {res['tier']} tier: students greedy (●) and beam 5 (▲)"
                 + (", CTranslate2 int8 (□)" if ct2 else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
