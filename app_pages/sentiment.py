import streamlit as st

st.title("sentiment")
