"""The baseline of bench/api.py: the smallest Flask app, served by gunicorn exactly like the orders
service, so the ratio to it measures what the orders service adds per request."""
from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def hello():
    return jsonify({"success": True, "data": {"hello": "world"}})


@app.post("/")
def echo():
    return jsonify({"success": True, "data": request.get_json()})
