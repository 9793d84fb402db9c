// Gremlin Server init script (gremlin-server.yaml, ScriptFileGremlinPlugin): bind the traversal
// source `g` to the TinkerGraph `graph`, for scripts and for bytecode requests aliased to g.
def globals = [:]
globals << [g : traversal().withEmbedded(graph)]
