# Builds Swift's three one-replica rings (account, container, object) in one Python run:
# swift-ring-builder would need nine processes (create, add, rebalance for each ring).
#
#   python3 swift_rings.py SWIFT_DIR HOST account=PORT container=PORT object=PORT
#
# Each ring has 2^6 partitions, one replica, and one device d1 on HOST:PORT; it is
# written to SWIFT_DIR/NAME.ring.gz, where the servers' swift_dir points.
import sys
from swift.common.ring import RingBuilder

swift_dir = sys.argv[1]
host = sys.argv[2]
for arg in sys.argv[3:]:
    name, port = arg.split('=')
    b = RingBuilder(6, 1, 1)
    b.add_dev({'id': 0, 'region': 1, 'zone': 1, 'ip': host, 'port': int(port),
               'device': 'd1', 'weight': 1})
    b.rebalance()
    b.get_ring().save('%s/%s.ring.gz' % (swift_dir, name))
