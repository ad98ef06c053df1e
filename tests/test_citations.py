"""Every paper the code base cites is cited by its exact title, first author and venue (../shared/reference/papers.md
lists them; the table below embeds them so that the suite does not depend on that file)."""
import re
from pathlib import Path

import pytest

from cemabench.registry import available
from cemabench.tables.spec import available_tables, load_table

# system: (exact title, first author's surname, venue), as in papers.md
PAPERS = {
    "CEMA": ("Towards Robust and Efficient Cloud-Edge Elastic Model Adaptation via Selective Entropy Distillation",
             "Chen", "ICLR 2024"),
    "ECCENTRIC": ("ECCENTRIC: Edge-Cloud Collaboration Framework for Distributed Inference Using Knowledge Adaptation",
                  "Kamani", "arXiv 2511.11719 (2025)"),
    "Tent": ("Tent: Fully Test-Time Adaptation by Entropy Minimization", "Wang", "ICLR 2021"),
    "EATA / ETA": ("Efficient Test-Time Model Adaptation without Forgetting", "Niu", "ICML 2022"),
    "SAR": ("Towards Stable Test-Time Adaptation in Dynamic Wild World", "Niu", "ICLR 2023"),
    "CoTTA": ("Continual Test-Time Domain Adaptation", "Wang", "CVPR 2022"),
    "DeYO": ("Entropy is not Enough for Test-Time Adaptation: From the Perspective of Disentangled Factors", "Lee",
             "ICLR 2024"),
    "RoTTA": ("Robust Test-Time Adaptation in Dynamic Scenarios", "Yuan", "CVPR 2023"),
    "SimATTA": ("Active Test-Time Adaptation: Theoretical Analyses and An Algorithm", "Gui", "ICLR 2024"),
    "RDumb / CCC": ("RDumb: A simple approach that questions our progress in continual test-time adaptation", "Press",
                    "NeurIPS 2023"),
    "ROID": ("Universal Test-time Adaptation through Weight Ensembling, Diversity Weighting, and Prior Correction",
             "Marsden", "WACV 2024"),
    "RMT": ("Robust Mean Teacher for Continual and Gradual Test-Time Adaptation", "Döbler", "CVPR 2023"),
    "CMF": ("Continual Momentum Filtering on Parameter Space for Online Test-time Adaptation", "Lee",
            "ICLR 2024 (OpenReview BllUWdpIOA)"),
    "CoLA": ("Cross-Device Collaborative Test-Time Adaptation", "Chen", "NeurIPS 2024"),
    "LAME": ("Parameter-free Online Test-time Adaptation", "Boudiaf", "CVPR 2022"),
    "BN adaptation": ("Improving robustness against common corruptions by covariate shift adaptation", "Schneider",
                      "NeurIPS 2020"),
    "ImageNet-C": ("Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", "Hendrycks",
                   "ICLR 2019"),
    "ImageNet-R": ("The Many Faces of Robustness: A Critical Analysis of Out-of-Distribution Generalization",
                   "Hendrycks", "ICCV 2021"),
    "COCO-C / Pascal-C / Cityscapes-C": ("Benchmarking Robustness in Object Detection: Autonomous Driving when Winter "
                                         "is Coming", "Michaelis", "arXiv 1907.07484 (2019)"),
    "SC2": ("SC2 Benchmark: Supervised Compression for Split Computing", "Matsubara", "TMLR 2023"),
    "Entropic Student": ("Supervised Compression for Resource-Constrained Edge Computing Systems", "Matsubara",
                         "WACV 2022"),
    # the entropy bottleneck's density (methods/entropy_bottleneck.py)
    "Scale hyperprior": ("Variational image compression with a scale hyperprior", "Ballé", "ICLR 2018"),
    "Neurosurgeon": ("Neurosurgeon: Collaborative Intelligence Between the Cloud and Mobile Edge", "Kang",
                     "ASPLOS 2017"),
    # the time model's constant-speed stream (README: The time model)
    "Compute-constrained TTA evaluation": ("Evaluation of Test-Time Adaptation Under Computational Time Constraints",
                                           "Alfarra", "ICML 2024"),
}
PAPERS_MD = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "papers.md"
CITATION = re.compile(r"^(\w+) et al\., (\w+(?: Workshops)? \d{4})")


def test_the_embedded_titles_are_those_of_papers_md():
    """Every paper cited here is a row of papers.md with the same title, first author and venue, and every row of its
    first table (the papers the code cites) is cited here. A row of its second table (papers of the open issues) may be
    cited before papers.md moves it: papers.md lives outside this repository, so the test holds for either place."""
    if not PAPERS_MD.is_file():
        pytest.skip(f"{PAPERS_MD} is not beside this clone")
    rows, first_table = {}, set()
    tables = 0
    for line in PAPERS_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| system"):
            tables += 1
        if len(cells) >= 4 and line.startswith("|") and cells[0] not in ("system", "---"):
            first_author = cells[2].split(",")[0].split(" (")[0].removesuffix(" et al.")
            rows[cells[0]] = (cells[1], first_author.split()[-1], cells[3].split(";")[0].strip())
            if tables == 1:
                first_table.add(cells[0])
    assert {system: rows.get(system) for system in PAPERS} == PAPERS
    assert first_table <= set(PAPERS), f"papers.md cites {sorted(first_table - set(PAPERS))}; the test does not"


@pytest.mark.parametrize("table", available_tables())
def test_every_table_spec_cites_its_papers_by_their_exact_titles(table):
    """A spec cites CEMA, ECCENTRIC or RDumb (the systems its tables reproduce; RDumb's CCC stream for the ccc table):
    first author, exact title and venue."""
    source = load_table(table).source
    cited = [system for system in ("CEMA", "ECCENTRIC") if system in source] + ["RDumb / CCC"] * ("RDumb" in source)
    assert cited, f"{table} cites neither CEMA, ECCENTRIC nor RDumb"
    for system in cited:
        title, author, venue = PAPERS[system]
        assert source.startswith(author) and title in source and venue.split(";")[0].split(" (")[0] in source


def test_every_method_cites_the_first_author_and_venue_of_a_cited_paper():
    cited = {(author, venue) for _, author, venue in PAPERS.values()}
    checked = 0
    for name, entry in available("methods").items():
        match = CITATION.match(entry.load().paper)
        if entry.dist.name == "cemabench" and match and match.group(1, 2) != ("Lee", "ICML Workshops 2013"):
            assert match.group(1, 2) in cited, f"{name}: {entry.load().paper}"
            checked += 1
    assert checked >= 9
