from edgepkd.cli import main

raise SystemExit(main())
