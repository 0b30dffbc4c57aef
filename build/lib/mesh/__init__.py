"""The mesh of nodes: Serf client, membership, Vivaldi coordinates, placement, relays.

Filled by the Mesh issue; the package exists so the layout is fixed from the start.
"""
