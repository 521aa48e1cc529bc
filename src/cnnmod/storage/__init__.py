"""Files: stores and compositions, the graph as data, atomic writes and the output-path policy, every form of a
user's model coming in, and exports to other runtimes going out."""
