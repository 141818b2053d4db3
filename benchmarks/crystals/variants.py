"""The crystals bases compared in benchmarks/crystals/README.md ("More data, and the coupling"), as
domains the CLI can name: `PYTHONPATH=benchmarks/crystals flowcoach pretrain variants:MoreData ...`.

Each is a CrystalsDomain with other constructor arguments. The first ones are velocity models (the
first shipped base, domains/crystals/base, is `Velocity`, the same as the domain
`flowcoach.domains.crystals:CrystalsVelocityDomain`); the shipped base-attn is `GeodesicX0Attention`
(`GeodesicX0`, base-x0, has mean messages), and the domain's default since the evening of 2026-12-06,
base-deep, is `GeodesicX0AttentionDeep` (then `CrystalsDomain()`) pretrained twice; base-struct is
base-deep and a third cycle with `--structure-weight 0.2`, base-scratch `GeodesicX0AttentionDeep` with it
from the first step, and base-wide, the default since the afternoon of 2026-12-07, `GeodesicX0AttentionDeepWide`
(= `CrystalsDomain()`) with it.
MORE is the data set with 1,053 more training-only binary compositions (463 crystals kept), shipped
in domains/crystals/shipped so these rows are remade from the same crystals.
"""

from flowcoach.domains.crystals import CrystalsDNGDomain, CrystalsDomain, CrystalsVelocityDomain
from flowcoach.domains.crystals.data import GenConfig

MORE = GenConfig(extra_compositions=1053)
WIDE = {"width": 96, "depth": 5, "distance_rbf": 16}  # the domain's default model before 2026-12-03


# the CLI takes a Domain instance as well as a class. The bases here before base-deep had 4 layers (WIDE:
# 5), named since the domain's default became 6; width 64, named since the default became 96 (base-wide)
Velocity = CrystalsVelocityDomain()  # how domains/crystals/base was made, with its RL recipe
Geodesic = CrystalsDomain(coupling="geodesic", predict="velocity", heads=0, depth=4, width=64)
Distances = CrystalsDomain(coupling="independent", predict="velocity", heads=0, distance_rbf=16, depth=4, width=64)
WideDistances = CrystalsDomain(coupling="independent", predict="velocity", heads=0, **WIDE)
MoreData = CrystalsDomain(gen=MORE, coupling="independent", predict="velocity", heads=0, depth=4, width=64)
MoreDataGeodesic = CrystalsDomain(gen=MORE, coupling="geodesic", predict="velocity", heads=0, depth=4, width=64)
MoreDataWideGeodesic = CrystalsDomain(gen=MORE, coupling="geodesic", predict="velocity", heads=0, **WIDE)


# half of the geodesic coupling: each atom's image nearest its noise, no same-element permutation (its
# records were made with a float64 loop of the same map, torus.nearest_image, before the domain had it)
NearestImage = CrystalsDomain(coupling="nearest", predict="velocity", heads=0, depth=4, width=64)

# 2026-12-06: the clean-crystal (x0) output on the torus geodesic (README, "Where the atoms go")
GeodesicX0 = CrystalsDomain(coupling="geodesic", predict="x0", heads=0, depth=4, width=64)
NearestX0 = CrystalsDomain(coupling="nearest", predict="x0", heads=0, depth=4, width=64)
GeodesicX0Distances = CrystalsDomain(coupling="geodesic", predict="x0", heads=0, distance_rbf=16, depth=4, width=64)

# 2026-12-06, later: attention over the pairs in place of mean messages (the domain's default since)
GeodesicX0Attention = CrystalsDomain(coupling="geodesic", predict="x0", heads=4, depth=4, width=64)
GeodesicX0Attention8 = CrystalsDomain(coupling="geodesic", predict="x0", heads=8, depth=4, width=64)
# 2026-12-06, evening: 6 layers (base-deep: this, then --init-from it for 8,000 more steps; the default since)
GeodesicX0AttentionDeep = CrystalsDomain(coupling="geodesic", predict="x0", heads=4, depth=6, width=64)
# 2026-12-07, evening: base-struct's model at width 96 (then the default was 64; base-wide, the default
# since): does width fit the larger binaries the 64-wide base fails (README, "Why RL does not move the
# stable rate")?
GeodesicX0AttentionDeepWide = CrystalsDomain(width=96)

# 2026-12-07, afternoon: de novo (elements generated) with base-wide's model and pretraining in place
# of the first kind's (base-dng); the geodesic coupling reads the elements from the data's type bits.
# The model of CrystalsDNGDomain() since (base-dng-wide), whose RL recipe the rows ran with flags
DNGWide = CrystalsDNGDomain(coupling="geodesic", predict="x0", heads=4, depth=6, width=96)
