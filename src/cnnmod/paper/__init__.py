"""The paper's evaluation (Pan & Rajan, ICSE 2022), apart from the engine: its scenarios (`experiments`), Table 1's
variants (`variants`), size/accuracy sweeps (`tradeoff`), plots and Markdown reports (`report`, which needs the
optional matplotlib: `pip install 'cnnmod[report]'`), the paper's own figures (`published`) and `cnnmod
reproduce` (`reproduce`, `profiles`, `html`).

Importing this package imports nothing else: each module loads what it needs.
"""
