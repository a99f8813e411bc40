"""Dockerfiles and `.dockerignore`, read as docker reads them; nothing here builds.

    parse      the text to instructions and stages (directives, continuations, flags, JSON)
    arguments  each instruction's arguments before substitution (ENV pairs, ARG, argv, ...)
    expand     docker's shell lexer: `$VAR`, `${VAR:-word}`, quotes, word splitting
    ignore     `.dockerignore` rules and Go's filepath.Match for COPY sources

A leaf package: only the standard library and `layerfs.errors`.
"""
