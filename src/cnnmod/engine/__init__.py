"""The engine: tracing (the one table of supported operations), activity counts, decomposition (the paper's
rule and compact modules), channel plans and materialised networks, modules, composition and its engines."""
