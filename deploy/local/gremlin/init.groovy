// Gremlin Server init script: bind the traversal source `g` to the TinkerGraph `graph`.
def globals = [:]
globals << [g : traversal().withEmbedded(graph)]
