"""MkDocs hook: the investigation log (benchmarks/README.md) as the page results/log.md, built from the file itself.

The log stays where its commands and records are (benchmarks/), and the site shows the same text: its links
to the records folder, to docs/images and to the results pages are rewritten for the page's place on the site.
"""

from pathlib import Path

from mkdocs.structure.files import File

LOG = Path(__file__).resolve().parents[1] / "benchmarks" / "README.md"


def on_files(files, config):
    text = LOG.read_text()
    text = text.replace("](../docs/images/", "](../images/").replace("](results/)", "](records.md)")
    text = text.replace("](../docs/results/", "](")  # the log's page sits beside the results pages
    files.append(File.generated(config, "results/log.md", content=text))
    return files
