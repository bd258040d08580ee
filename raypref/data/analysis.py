"""How users of a population agree: opinion differences, similarity, mutual neighbours.

Following Liu 2024 §3.2.2 / §3.3.1: each user's choices over a set of queries become one
preference vector; the *difference* matrix counts queries where two users pick a different
best response, the *similarity* matrix holds cosine similarities of preference vectors,
and two users are linked when each is among the other's top-5 most similar users.
Plots use matplotlib's Agg canvas directly (no pyplot global state, no display needed).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from raypref.data.users import User
from raypref.data.world import ASPECTS, World

Query = Sequence[dict[str, float]]  # latent scores of the candidate responses of one prompt


def sample_queries(world: World, n: int, rng: np.random.Generator, k: int = 4,
                   split: str = "test", non_dominated: bool = True) -> list[list[dict]]:
    """``n`` queries of ``k`` candidates each (their latent scores). With ``non_dominated``
    keep only queries where no candidate dominates another on the aspects (Liu 2024 §3.3.1)."""
    pool = world.prompt_pool(split)
    queries: list[list[dict]] = []
    for _ in range(200 * n + 100):
        if len(queries) == n:
            break
        prompt = pool[int(rng.integers(len(pool)))]
        scores = [r.latent for r in world.candidates(prompt, k, rng)]
        if not non_dominated or not _has_dominated(scores):
            queries.append(scores)
    if len(queries) < n:
        raise RuntimeError(f"sample_queries: found only {len(queries)} of {n} queries")
    return queries


def _has_dominated(scores: list[dict]) -> bool:
    table = np.array([[s[a] for a in ASPECTS] for s in scores])
    for i in range(len(table)):
        for j in range(len(table)):
            if i != j and np.all(table[i] >= table[j]) and np.any(table[i] > table[j]):
                return True
    return False


def utilities(users: Sequence[User], queries: Sequence[Query]) -> np.ndarray:
    """[users, queries, candidates] utility of every candidate for every user."""
    if not users or not queries:
        raise ValueError("utilities: need at least one user and one query")
    k = len(queries[0])
    if any(len(q) != k for q in queries):
        raise ValueError("utilities: all queries must have the same number of candidates")
    return np.array([[[u.utility(s) for s in q] for q in queries] for u in users])


def preference_vectors(users: Sequence[User], queries: Sequence[Query]) -> np.ndarray:
    """[users, queries * pairs]: for each query and candidate pair i<j, +1 when the user
    prefers i, -1 when j, 0 on a tie."""
    util = utilities(users, queries)
    i, j = np.triu_indices(util.shape[2], k=1)
    return np.sign(util[:, :, i] - util[:, :, j]).reshape(len(users), -1)


def opinion_difference_matrix(users: Sequence[User], queries: Sequence[Query]) -> np.ndarray:
    """[users, users] number of queries on which two users pick a different best response."""
    best = utilities(users, queries).argmax(axis=2)
    return (best[:, None, :] != best[None, :, :]).sum(axis=2)


def similarity_matrix(vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of preference vectors (rows); a zero vector is similar only to itself."""
    vectors = np.asarray(vectors, dtype=float)
    if vectors.ndim != 2:
        raise ValueError(f"similarity_matrix: expected a 2-D array, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = vectors / safe[:, None]
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    return sim


def mutual_top_k_edges(similarity: np.ndarray, k: int = 5) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, where each is among the other's ``k`` most similar users."""
    sim = np.array(similarity, dtype=float)
    n = len(sim)
    if sim.shape != (n, n):
        raise ValueError(f"mutual_top_k_edges: expected a square matrix, got shape {sim.shape}")
    np.fill_diagonal(sim, -np.inf)  # a user is not its own neighbour
    top = [set(np.argsort(-sim[i], kind="stable")[: min(k, n - 1)].tolist()) for i in range(n)]
    return [(i, j) for i in range(n) for j in top[i] if i < j and i in top[j]]


# ----- plots -----------------------------------------------------------------------------
def plot_matrix(matrix: np.ndarray, path: str | Path, title: str,
                labels: Sequence[str] | None = None, cmap: str = "viridis") -> Path:
    """Heat map of a square matrix as PNG."""
    fig = Figure(figsize=(6, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap=cmap)
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    if labels is not None and len(labels) <= 30:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    return _save(fig, path)


def plot_neighbour_graph(edges: Sequence[tuple[int, int]], labels: Sequence[str],
                         groups: Sequence[str], path: str | Path, title: str) -> Path:
    """Users on a circle (grouped), lines between mutual neighbours, colour by group."""
    n = len(labels)
    angle = 2 * np.pi * np.arange(n) / max(n, 1)
    x, y = np.cos(angle), np.sin(angle)
    fig = Figure(figsize=(6, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, j in edges:
        ax.plot([x[i], x[j]], [y[i], y[j]], color="0.6", linewidth=0.6, zorder=1)
    names = sorted(set(groups))
    for colour_index, group in enumerate(names):
        members = [i for i in range(n) if groups[i] == group]
        ax.scatter(x[members], y[members], s=25, label=group, zorder=2,
                   color=f"C{colour_index % 10}")
    if n <= 30:
        for i in range(n):
            ax.annotate(labels[i], (x[i], y[i]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_title(f"{title} ({len(edges)} edges)")
    ax.set_xlim(-1.3, 1.3)  # fixed limits: a 2-user circle is flat and would autoscale to nothing
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_counts(counts: dict[int, int], path: str | Path, title: str) -> Path:
    """Bar plot of pairs per user id."""
    fig = Figure(figsize=(max(4, 0.08 * len(counts) + 3), 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ids = sorted(counts)
    ax.bar([str(i) for i in ids], [counts[i] for i in ids])
    ax.set_xlabel("user id")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    if len(ids) > 30:
        ax.set_xticks(range(0, len(ids), 10), [str(ids[i]) for i in range(0, len(ids), 10)])
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_population_analysis(users: Sequence[User], queries: Sequence[Query],
                              out_dir: str | Path, title: str, k: int = 5) -> dict:
    """Difference and similarity matrices (PNG + .npy) and the mutual top-``k`` graph
    (PNG + edges.json) of ``users`` over ``queries`` in ``out_dir``; returns summary numbers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [u.group for u in users]
    # name users by group where groups are unique (P-Soups preferences), else by id
    labels = groups if len(set(groups)) == len(users) else [str(u.user_id) for u in users]
    difference = opinion_difference_matrix(users, queries)
    similarity = similarity_matrix(preference_vectors(users, queries))
    edges = mutual_top_k_edges(similarity, k)
    np.save(out_dir / "difference.npy", difference)
    np.save(out_dir / "similarity.npy", similarity)
    (out_dir / "edges.json").write_text(json.dumps([[users[i].user_id, users[j].user_id]
                                                    for i, j in edges]))
    plot_matrix(difference, out_dir / "difference.png",
                f"{title}: differing best choices over {len(queries)} queries", labels)
    plot_matrix(similarity, out_dir / "similarity.png", f"{title}: preference similarity",
                labels, cmap="Greys")
    plot_neighbour_graph(edges, labels, groups, out_dir / "neighbours.png",
                         f"{title}: mutual top-{k} neighbours")
    off_diagonal = ~np.eye(len(users), dtype=bool)
    return {"mean_difference": float(difference[off_diagonal].mean()) if len(users) > 1 else 0.0,
            "mean_similarity": float(similarity[off_diagonal].mean()) if len(users) > 1 else 1.0,
            "neighbour_edges": len(edges)}
